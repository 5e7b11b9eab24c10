"""The frozen teacher inside the student's pipeline schedule (vigos_megatron.schedule), real tiny Qwen2.5-VL.

Inputs (tests/dist/schedule_common.py): synthetic samples -> ContextEncoder -> fixed valid and
invalid completions -> parse_completion -> assemble_vigos -> 2 micro-batches of 2 rollouts
(R = 6 rows: 2 student, 4 teacher slots), each micro-batch at its own length.

* fast: the stream batches line up (every supervised token is the same completion token in the
  student row and in its teacher row, after padding to the micro-batch's S);
* fast: with ``group_by_length`` the same supervised tokens run in no more stream tokens, the
  longest rollouts together;
* fast: at PP=1, the loss and the student gradients of the stage path (megatron schedule, DDP,
  finalize_model_grads) equal a direct computation: student and teacher models run separately on
  the same rows, float64 ViGOS by hand on the supervised tokens; the teacher is perturbed so
  that it differs from the student; the loss from hidden states (untied and tied embeddings) and
  from logits;
* fast: ``StreamBatch.teacher_only`` (the teacher pass of ``loss.vgs.quantile_scope: global``) runs no
  student row and returns the full pass's teacher rows bit for bit;
* slow: PP=2 (tied) and TP=2xPP=2 with the loss from hidden states give the PP=1 loss and student
  gradients of the logits path (by HF name, gathered over TP/PP by megatron-bridge's export;
  the output weight's gradient included), with a separate teacher checkpoint; the teacher gets no
  grad, stays bit-identical after an SGD step and holds no DDP buffer.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

DIST = Path(__file__).parent / "dist"
if str(DIST) not in sys.path:
    sys.path.insert(0, str(DIST))

import schedule_common as sc  # noqa: E402

from vigos_megatron.testing.kl_reference import logical_index  # noqa: E402

from schedule_common import PER_TENSOR_REL_TOL, REL_TOL  # noqa: E402

#: teacher perturbation in the single-process test (so that teacher != student)
TEACHER_NOISE = 0.02


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vigos_megatron.testing import tiny_qwen3_vl
    from vigos_megatron.testing.tiny_qwen import TEACHER_TEXT_SIZE, write_tiny_checkpoint

    base = tmp_path_factory.mktemp("sched")
    return {
        "base": base,
        "student": write_tiny_checkpoint(base / "student", seed=0),
        "teacher": write_tiny_checkpoint(base / "teacher", seed=3),
        # tied embeddings: at PP>1 the first and last stages hold a copy of the word embedding
        # and finalize_model_grads all-reduces its gradient through the stage's
        # shared_embedding_or_output_weight()
        "student_tied": write_tiny_checkpoint(base / "student_tied", tie_word_embeddings=True, seed=1),
        "teacher_tied": write_tiny_checkpoint(base / "teacher_tied", tie_word_embeddings=True, seed=4),
        # a teacher of another width, depth and head count (hidden 96 / 3 layers / 6 heads vs 64 / 2 / 4)
        "teacher_larger": write_tiny_checkpoint(base / "teacher_larger", seed=5, text_size=TEACHER_TEXT_SIZE),
        # the same on Qwen3-VL (deepstack): hidden 96 / 6 layers / 6 heads teaching 64 / 4 / 4
        "student_qwen3": tiny_qwen3_vl.write_tiny_checkpoint(base / "student_qwen3", seed=0),
        "teacher_larger_qwen3": tiny_qwen3_vl.write_tiny_checkpoint(base / "teacher_larger_qwen3", seed=4,
                                                                    text_size=tiny_qwen3_vl.TEACHER_TEXT_SIZE),
    }


# ----------------------------------------------------------------------------- fast


def test_stream_batches_align_student_and_teacher_tokens(tiny):
    inputs = sc.build_inputs(tiny["student"])
    assert inputs.valid == [True, False, True, False]
    assert len(inputs.batches) == 2
    for b in inputs.batches:
        S = b.seq_length  # each micro-batch at its own length
        assert (b.rows, b.num_student_rows, b.rollouts) == (6, 2, 2)
        assert S % sc.SEQ_MULTIPLE == 0
        ids = torch.cat([b.student.input_ids, b.teacher.input_ids])  # the stream [R, S]
        flat = ids.reshape(-1)
        t = b.tokens
        # the tokens index the last stage's [N, V/tp]; mapped back to the full-length layout, the
        # logits at flat index i predict the token at flat index i + 1 of the same row
        s_idx, t_idx = logical_index(b, t.student_index), logical_index(b, t.teacher_index)
        assert ((s_idx % S) < S - 1).all() and ((t_idx % S) < S - 1).all()
        assert torch.equal(flat[s_idx + 1], flat[t_idx + 1])
        assert (s_idx // S < b.num_student_rows).all() and (t_idx // S >= b.num_student_rows).all()
        # one image per rollout, stored once; each image row names it (rollout b's rows show image b)
        assert len(b.images) == b.rollouts
        assert b.images.pixel_values.shape[0] == int(b.images.grid_thw.prod(dim=1).sum())
        assert b.student.row_images == [0, 1]
        # invalid rollout (b = 1): its reasoning slot (row 5) is an unused all-pad row, no image
        assert b.teacher.row_images == [0, 1, 0, None]
        assert b.teacher.grid_thw(b.images).shape[0] == 3
        # every slot at the micro-batch's longest row of that slot (rounded), no real token cut off
        B = b.rollouts
        assert b.slot_lengths[0] == S and all(0 < s_c <= S and s_c % sc.SEQ_MULTIPLE == 0 for s_c in b.slot_lengths)
        assert b.slot_lengths[2] < S  # the reasoning context is shorter than the student's rows
        for c, s_c in enumerate(b.slot_lengths):
            assert (ids[c * B:(c + 1) * B, s_c:] == sc.pad_id(tiny["student"])).all()
        assert b.stream_length == B * sum(b.slot_lengths)
        # the logits the last stage computes: exactly the positions the loss reads, slot by slot,
        # sorted, each read by some token
        n = sum(p.numel() for p in b.positions)
        assert sorted(set(t.student_index.tolist()) | set(t.teacher_index.tolist())) == list(range(n))
        for c, pos in enumerate(b.positions):
            assert bool((pos[1:] > pos[:-1]).all()) and (pos.numel() == 0 or int(pos.max()) < B * b.slot_lengths[c])
    # each micro-batch is padded to its own longest row (rounded up to SEQ_MULTIPLE), not the
    # step's: the two have different lengths, so the pipeline tests send streams of two shapes
    pad = sc.pad_id(tiny["student"])
    for b in inputs.batches:
        real = torch.cat([b.student.input_ids, b.teacher.input_ids]) != pad  # [R, S]
        longest = int(real.any(dim=0).nonzero().max()) + 1
        assert b.seq_length - sc.SEQ_MULTIPLE < longest <= b.seq_length
    assert len({b.seq_length for b in inputs.batches}) == 2
    assert len({b.stream_length for b in inputs.batches}) == 2


def test_group_by_length_pads_less_and_keeps_every_token(tiny):
    plain, grouped = sc.build_inputs(tiny["student"]), sc.build_inputs(tiny["student"], group_by_length=True)
    assert len(grouped.batches) == len(plain.batches)
    # the same supervised tokens (segment by segment), in fewer stream tokens
    for seg in range(3):
        assert (sum(int((b.tokens.segment == seg).sum()) for b in grouped.batches)
                == sum(int((b.tokens.segment == seg).sum()) for b in plain.batches))
    assert sum(b.stream_length for b in grouped.batches) <= sum(b.stream_length for b in plain.batches)
    pad = sc.pad_id(tiny["student"])
    real = [int((torch.cat([b.student.input_ids, b.teacher.input_ids]) != pad).sum()) for b in grouped.batches]
    assert real == sorted(real, reverse=True) and real[0] > real[-1]  # the longest rollouts together, first


def _vigos_reference(batches, student, teacher, lambdas):
    """float64 ViGOS over the whole step, student and teacher run separately (autograd into the student)."""
    from vigos_megatron.runtime import model_device
    from vigos_megatron.testing.kl_reference import rows_model_kwargs

    per_seg = [[], [], []]
    for b in batches:
        b = b.to(model_device(student))
        zs = student(**rows_model_kwargs(b.student, b.images))
        with torch.no_grad():
            zt = teacher(**rows_model_kwargs(b.teacher, b.images))
        assert zs.shape[:2] == (b.num_student_rows, b.seq_length) and zt.shape[:2] == (b.rows - b.num_student_rows, b.seq_length)
        flat = torch.cat([zs, zt]).reshape(b.rows * b.seq_length, -1).double()
        ls = torch.log_softmax(flat[logical_index(b, b.tokens.student_index)], -1)
        lt = torch.log_softmax(flat[logical_index(b, b.tokens.teacher_index)], -1)
        forward = (lt.exp() * (lt - ls)).sum(-1)  # KL(q_T || p_S)
        reverse = (ls.exp() * (ls - lt)).sum(-1)  # KL(p_S || q_T)
        seg = b.tokens.segment
        kl = torch.where(seg == 2, reverse, forward)
        for s in range(3):
            per_seg[s].append(kl[seg == s])
    terms = [torch.cat(v) for v in per_seg]
    return sum(lam * t.mean() for lam, t in zip(lambdas, terms) if t.numel())


@pytest.mark.parametrize("share_vision,kind,from_hidden,larger",
                         [(False, "", True, False), (True, "", True, False), (False, "_tied", True, False),
                          (False, "", False, False), (False, "", True, True), (False, "", False, True),
                          (False, "_qwen3", True, True)],
                         ids=["own-towers", "frozen-shared-tower", "tied-embeddings", "from-logits",
                              "larger-teacher", "larger-teacher-from-logits", "qwen3-vl-larger-teacher"])
def test_stage_path_equals_direct_computation_pp1(tiny, share_vision, kind, from_hidden, larger):
    """The stage (the loss from hidden states or logits at the loss positions only, one vision-tower
    pass per image and model) against ``Qwen25VLModel.forward`` on every row with full logits.
    ``frozen-shared-tower``: the student's tower is frozen and the stage reuses the teacher's
    features for it (the teacher's language model is perturbed, its tower is not).
    ``larger-teacher``: a teacher of its own with another width, depth and head count, run on its own
    outside the schedule for the reference (``qwen3-vl-...``: a tiny Qwen3-VL pair, deepstack on, hidden
    96 / 6 layers / 6 heads teaching 64 / 4 / 4)."""
    from vigos_megatron.models.family import family_of
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.schedule import LOSS_KEY, StudentTeacherStage, reduce_reports, run_stream_schedule

    t0 = time.perf_counter()
    hf = tiny["student" + kind]
    with local_model_parallel() as ps:
        inputs = sc.build_inputs(hf)
        _, student, teacher = sc.build_models(hf, 1, 1, teacher_hf=tiny["teacher_larger" + kind] if larger else None)
        if larger:
            assert teacher.config.hidden_size == 96 and student.config.hidden_size == 64
        if share_vision:
            student.freeze(freeze_language_model=False, freeze_vision_model=True, freeze_vision_projection=True)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in teacher.named_parameters():
                if not (larger or share_vision and n.startswith("visual.")):
                    p.add_(torch.randn(p.shape, generator=g).to(p.device) * TEACHER_NOISE)
        cfg, counts, loss_fn = sc.make_loss(inputs.batches, ps)
        if kind != "_qwen3":  # perception, reasoning, reference tokens of the step (the Qwen2.5 tokenizer)
            assert counts.tolist() == [17.0, 34.0, 40.0]

        student.train()
        ref_loss = _vigos_reference(inputs.batches, student, teacher,
                                    (cfg.lambda_perception, cfg.lambda_reasoning, cfg.lambda_reference))
        ref_loss.backward()
        ref_grads = {n: p.grad.detach().double().clone() for n, p in student.named_parameters() if p.requires_grad}
        student.zero_grad(set_to_none=True)

        stage = StudentTeacherStage(student, teacher, share_vision=share_vision, from_hidden=from_hidden)
        model = sc.wrap_ddp(stage)
        model.train()
        assert teacher.training is False and student.training is True
        model.zero_grad_buffer()
        tower_calls = {"student": 0, "teacher": 0}
        hooks = [family_of(m).vision_tower(m).register_forward_hook(
                     lambda *a, k=k: tower_calls.__setitem__(k, tower_calls[k] + 1))
                 for k, m in (("student", student), ("teacher", teacher))]
        try:
            reports = run_stream_schedule([model], inputs.batches, loss_fn)
        finally:
            for h in hooks:
                h.remove()
        loss = reduce_reports(reports, ps.get_data_parallel_group())[LOSS_KEY]
        grads = {n: p.main_grad.double() for n, p in student.named_parameters() if p.requires_grad}
    n_mb = len(inputs.batches)
    # one tower pass per model and micro-batch (all its images in one call), none for a shared student tower
    assert tower_calls == {"student": 0 if share_vision else n_mb, "teacher": n_mb}, tower_calls

    loss_err = abs(loss - float(ref_loss)) / abs(float(ref_loss))
    flat_ref = torch.cat([ref_grads[n].reshape(-1) for n in sorted(ref_grads)])
    flat = torch.cat([grads[n].reshape(-1) for n in sorted(grads)])
    grad_err = float((flat - flat_ref).norm() / flat_ref.norm())
    worst = max(float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()) for n in grads)
    print(f"PP=1 stage{kind} from {'hidden states' if from_hidden else 'logits'} vs direct "
          f"({'shared' if share_vision else 'own'} towers): loss {loss:.6e} (ref {float(ref_loss):.6e}, rel err {loss_err:.2e}); "
          f"grad rel err {grad_err:.2e} (worst tensor {worst:.2e}); {time.perf_counter() - t0:.1f}s")
    assert float(ref_loss) > 0
    assert loss_err < REL_TOL
    assert grad_err < REL_TOL
    assert worst < PER_TENSOR_REL_TOL
    assert all(p.grad is None for p in teacher.parameters())
    assert all(float(v.norm()) > 0 for v in ref_grads.values()), "every student tensor should get a gradient"


def test_teacher_only_view_runs_the_teacher_alone(tiny):
    """``StreamBatch.teacher_only`` (the teacher pass of VGS's ``quantile_scope: global``): the stage runs no
    student row and no student tower, returns the teacher's rows bit for bit as in the full pass (hidden states
    and logits, a teacher of another width), and the shifted teacher indices select the same rows."""
    from vigos_megatron.models.family import family_of
    from vigos_megatron.schedule import StudentTeacherStage
    from vigos_megatron.startup import local_model_parallel

    with local_model_parallel():
        inputs = sc.build_inputs(tiny["student"])
        _, student, teacher = sc.build_models(tiny["student"], 1, 1, teacher_hf=tiny["teacher_larger"])
        calls = []
        hook = family_of(student).vision_tower(student).register_forward_hook(lambda *a: calls.append(1))
        try:
            for from_hidden in (True, False):
                stage = StudentTeacherStage(student, teacher, from_hidden=from_hidden)
                for batch in inputs.batches:
                    view = batch.teacher_only()
                    assert view.stream_length == batch.rollouts * sum(batch.slot_lengths[batch.student_slots:])
                    with torch.no_grad():
                        full_s, full_t = stage(batch)
                        n_calls = len(calls)
                        only_s, only_t = stage(view)
                    assert len(calls) == n_calls and only_s.shape[0] == 0 and torch.equal(only_t, full_t)
                    width = student.config.hidden_size if from_hidden else full_s.shape[1]
                    assert only_s.shape[1] == width
                    shift = full_s.shape[0]
                    assert torch.equal(view.tokens.teacher_index, batch.tokens.teacher_index - shift)
                    assert torch.equal(view.tokens.student_index, batch.tokens.student_index)
        finally:
            hook.remove()


# ----------------------------------------------------------------------------- slow (torchrun)


@pytest.fixture(scope="module")
def pp1_reference(tiny):
    """``reference(kind, teacher)``: the PP=1 single-process step for the student ``kind`` ("" or "_tied")
    and the teacher checkpoint ``teacher`` with the loss from logits (the reference path), computed once."""
    from vigos_megatron.startup import local_model_parallel

    cache = {}

    def reference(kind: str, teacher: str) -> dict:
        if (kind, teacher) not in cache:
            t0 = time.perf_counter()
            with local_model_parallel() as ps:
                cache[kind, teacher] = sc.run_step(tiny["student" + kind], 1, 1, ps,
                                                   teacher_hf=tiny["teacher" + teacher], from_hidden=False)
            print(f"PP=1 reference step{kind}{teacher}: {time.perf_counter() - t0:.1f}s")
        return cache[kind, teacher]

    return reference


@pytest.mark.slow
@pytest.mark.parametrize("kind,teacher,tp,pp", [("_tied", "_tied", 1, 2), ("", "_larger", 1, 2), ("", "_larger", 2, 1),
                                                ("", "_larger", 2, 2), ("_qwen3", "_larger_qwen3", 1, 2)],
                         ids=["pp2-tied", "pp2-larger-teacher", "tp2-larger-teacher", "tp2xpp2-larger-teacher",
                              "qwen3-vl-pp2-larger-teacher"])
def test_pipeline_layouts_match_pp1(torchrun, tiny, pp1_reference, kind, teacher, tp, pp):
    """``larger-teacher``: the teacher (hidden 96, 3 layers, 6 heads) runs inside the student's schedule
    (its layers split [2, 1] over PP=2), the stream carrying both widths; on Qwen3-VL (6 layers, [3, 3]) its
    deepstack features enter its first-stage layers."""
    ref = pp1_reference(kind, teacher)
    out = tiny["base"] / f"result{kind}{teacher}_tp{tp}_pp{pp}.pt"
    t0 = time.perf_counter()
    torchrun("schedule_parity.py", tp * pp, "--tp", tp, "--pp", pp, "--hf", tiny["student" + kind],
             "--teacher-hf", tiny["teacher" + teacher], "--out", out)
    wall = time.perf_counter() - t0
    res = torch.load(out, weights_only=False)
    assert res["world_size"] == tp * pp
    sc.compare_to_pp1(res, ref, f"TP={tp} PP={pp}{kind.replace('_', ' ')} ({wall:.1f}s launch)")
