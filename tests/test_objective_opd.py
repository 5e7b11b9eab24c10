"""The ``opd`` objective (standard on-policy distillation, the VGS paper's baseline).

* fast: the rows a rollout contributes (student context + completion, twice), every completion token
  scored with reverse KL; the loss is the token-mean reverse KL; loss and gradient are exactly zero
  when the teacher's logits equal the student's (the default self-teacher under the student's own
  context);
* the training loop's first-step parity with a separate teacher (of another size) across layouts:
  tests/test_teacher_size.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vigos_megatron import objectives
from vigos_megatron.losses.objectives import DistillTokens
from vigos_megatron.testing.kl_reference import kl_reference

ROOT = Path(__file__).resolve().parents[1]
V = 96


def _cfg(*overrides):
    from vigos_megatron.config.loader import load_config
    from vigos_megatron.config.train import PretrainConfig

    return load_config(PretrainConfig, ROOT / "conf/tiny_cpu.yaml", ["run_dir=unused", *overrides])


def test_opd_is_registered_and_configured():
    cfg = _cfg("loss.objective=opd")
    opd = objectives.get("opd")
    assert opd.contexts(cfg) == ("student",) and opd.terms == ("std",)
    assert (cfg.loss.opd.weight, cfg.loss.opd.clip) == (1.0, 0.0)
    from vigos_megatron.config.loader import load_config
    from vigos_megatron.config.train import PretrainConfig

    composed = load_config(PretrainConfig, ROOT / "conf/tiny_cpu.yaml", ["run_dir=unused"])
    assert composed.loss.objective == "vigos" and hasattr(composed.loss, "opd")


def test_opd_rows_and_loss():
    from vigos_megatron.rollout.segments import CompletionSegments
    from vigos_megatron.training.rollouts import Rollout

    ctx = {"student": torch.arange(10, 17)}
    completion = torch.tensor([40, 41, 42, 43])
    r = Rollout(sample={"contexts": ctx}, completion=completion, finish_reason="stop",
                segments=CompletionSegments(num_tokens=4, valid=False, reason="x"), correct=False)
    opd = objectives.get("opd")
    a = opd.assemble(r, _cfg("loss.objective=opd"), cut=None)
    assert torch.equal(a.student_slots[0].ids, a.teacher_slots[0].ids)
    assert a.teacher_slots[0].context == "student" and len(a.scores) == 4
    mb = opd.pack([a], pad_id=0, multiple=16)
    n = sum(p.numel() for p in mb.positions)  # the last stage's logits [N, V/tp] at the loss positions
    assert n == 8  # 4 student + 4 teacher positions
    g = torch.Generator().manual_seed(0)
    out = (torch.randn(n, V, generator=g) * 2).requires_grad_()
    settings = _cfg("loss.objective=opd").loss.opd
    fn = opd.build_loss(settings, [mb.tokens], chunk_bytes=4096, impl="torch", dp_group=None, tp_group=None)
    loss, n, report = fn(mb.tokens, out)
    flat = out.detach().reshape(-1, V)
    ref = kl_reference(flat[mb.tokens.student_index], flat[mb.tokens.teacher_index], "reverse").mean()
    assert int(n) == 4 and abs(float(loss / n) - float(ref)) < 1e-5 and float(ref) > 0.1
    assert set(report) >= {"kl/std", "clip_fraction"}


def test_opd_loss_and_gradient_are_zero_when_the_teacher_equals_the_student():
    opd = objectives.get("opd")
    g = torch.Generator().manual_seed(1)
    S = 6
    logits = torch.randn(S, V, generator=g) * 3
    out = torch.stack([logits, logits], dim=0).requires_grad_()  # row 0 student, row 1 teacher: equal
    pos = torch.arange(S)
    tokens = DistillTokens(pos, S + pos, torch.zeros(S, dtype=torch.long))
    fn = opd.build_loss(_cfg().loss.opd, [tokens], chunk_bytes=4096, impl="torch", dp_group=None, tp_group=None)
    loss, n, _ = fn(tokens, out)
    loss.backward()
    assert float(loss) == 0.0 and int(n) == S
    assert float(out.grad.abs().max()) == 0.0
