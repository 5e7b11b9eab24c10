"""The GPU lane: the model, one in-schedule ViGOS step and the losses on a CUDA device, the model
and the step on each family (tiny Qwen2.5-VL; tiny Qwen3-VL with deepstack).

Every test here is marked ``gpu`` and skipped where no CUDA device is in use (conftest).
``make test-gpu`` runs the whole suite on a GPU machine: these plus every CPU test (the
multi-rank cases force CPU + gloo, see ``vigos_megatron.testing.distributed``).

bf16 tolerances: a bf16 forward of the tiny models differs from fp32 by the storage
rounding of every activation (~2^-8 relative per op), so values are compared by relative norm
error, and the step's loss / gradient against the CPU fp32 result of the same step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

DIST = Path(__file__).parent / "dist"
if str(DIST) not in sys.path:
    sys.path.insert(0, str(DIST))

pytestmark = pytest.mark.gpu

#: bf16 vs fp32: relative norm error of logits / loss / flattened gradient
BF16_LOGITS_TOL = 3e-2
BF16_LOSS_TOL = 3e-2
BF16_GRAD_TOL = 8e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


#: ``tiny.family`` -> the module writing its tiny random checkpoint
WRITERS = {"qwen2_5_vl": "vigos_megatron.testing.tiny_qwen", "qwen3_vl": "vigos_megatron.testing.tiny_qwen3_vl"}


@pytest.fixture(scope="module", params=sorted(WRITERS))
def tiny(tmp_path_factory, request):
    import importlib

    write_tiny_checkpoint = importlib.import_module(WRITERS[request.param]).write_tiny_checkpoint
    base = tmp_path_factory.mktemp(f"gpu_{request.param}")
    return {"base": base, "family": request.param, "student": write_tiny_checkpoint(base / "student", seed=0),
            "teacher": write_tiny_checkpoint(base / "teacher", seed=3)}


def _image_text_batch(tiny) -> dict:
    """Image+text prompts for HF (two images; Qwen3-VL's of two sizes, right-padded) and their real positions."""
    if tiny["family"] == "qwen3_vl":
        from vigos_megatron.testing.tiny_qwen3_vl import image_text_batch

        batch = image_text_batch(tiny["student"])
        return batch, batch["attention_mask"].bool()
    from model_parallel import make_batch

    batch = make_batch(tiny["student"])
    return batch, torch.ones(batch["input_ids"].shape, dtype=torch.bool)


def test_model_on_cuda_bf16_matches_hf_on_the_same_device(tiny):
    from vigos_megatron.models.builder import QwenVLBuilder, load_hf_config
    from vigos_megatron.models.family import family_for_config
    from vigos_megatron.models.forward import chunk_forward
    from vigos_megatron.runtime import model_device
    from vigos_megatron.startup import local_model_parallel

    batch, real = _image_text_batch(tiny)
    with local_model_parallel():
        builder = QwenVLBuilder.from_hf(tiny["student"], dtype=torch.bfloat16)
        model = builder.build_from_hf(tiny["student"])[0].eval()
        dev = model_device(model)
        assert dev.type == "cuda" and all(p.dtype == torch.bfloat16 for p in model.parameters())
        with torch.no_grad():
            out = chunk_forward(model, {k: batch[k] for k in ("input_ids", "pixel_values", "image_grid_thw")})
    hf_class = family_for_config(load_hf_config(tiny["student"])).hf_model_class()
    hf = hf_class.from_pretrained(tiny["student"], dtype=torch.bfloat16, attn_implementation="sdpa").to(dev).eval()
    with torch.no_grad():
        ref = hf(**{k: v.to(dev) for k, v in batch.items()}).logits
    assert out.device == ref.device and out.shape == ref.shape
    real = real.to(dev)
    out, ref = out[real], ref[real]
    err = _rel(out.float(), ref.float())
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    print(f"{tiny['family']} bf16 on {dev}: logits rel err vs HF {err:.2e}, argmax agreement {agree:.3f}")
    assert err < BF16_LOGITS_TOL and agree > 0.95


def test_one_vigos_step_in_schedule_on_cuda_matches_cpu_fp32(tiny):
    """Student+teacher stage, megatron DDP, finalize_model_grads, NCCL, bf16 on one GPU vs the
    same step in fp32 on the CPU (a forced-CPU gloo process)."""
    import schedule_common as sc

    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.testing.distributed import run_torchrun

    out = tiny["base"] / "cpu_fp32_step.pt"
    run_torchrun(DIST / "schedule_parity.py", 1, "--tp", 1, "--pp", 1, "--hf", tiny["student"],
                 "--teacher-hf", tiny["teacher"], "--out", out)
    ref = torch.load(out, weights_only=False)
    import torch.distributed as dist

    with local_model_parallel() as ps:
        assert dist.get_backend() == "nccl"
        res = sc.run_step(tiny["student"], 1, 1, ps, teacher_hf=tiny["teacher"], dtype=torch.bfloat16)
    names = sorted(ref["grads"])
    loss_err = abs(res["loss"] - ref["loss"]) / abs(ref["loss"])
    grad_err = _rel(torch.cat([res["grads"][n].reshape(-1) for n in names]),
                    torch.cat([ref["grads"][n].reshape(-1) for n in names]))
    print(f"{tiny['family']} ViGOS step bf16/NCCL vs CPU fp32: loss {res['loss']:.6e} vs {ref['loss']:.6e} (rel {loss_err:.2e}), "
          f"grad rel err {grad_err:.2e}, checks {res['checks']}")
    assert loss_err < BF16_LOSS_TOL and grad_err < BF16_GRAD_TOL
    for key in ("teacher_grad_not_none", "teacher_requires_grad", "teacher_changed", "teacher_in_ddp_buffers"):
        assert res["checks"][key] == 0, key


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_on_cuda_tensors_match_float64(direction, dtype):
    from vigos_megatron.losses.vocab_parallel_kl import vocab_parallel_kl
    from vigos_megatron.runtime import compute_device
    from vigos_megatron.testing.kl_reference import clipped_reference, kl_reference

    dev = compute_device()
    g = torch.Generator().manual_seed(5)
    n, v = 64, 151936
    s = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = (torch.randn(n, v, generator=g) * 3).to(dtype)
    for temperature, clip_at_median in ((1.0, False), (1.7, False), (1.0, True)):
        # clip at the median token KL: half the tokens clipped (value clip, zero gradient)
        clip = float(kl_reference(s.double(), t.double(), direction, temperature).median()) if clip_at_median else None
        s_ref = s.double().requires_grad_()
        ref = clipped_reference(kl_reference(s_ref, t.double(), direction, temperature), clip)
        ref.sum().backward()
        s_dev = s.to(dev).requires_grad_()
        kl = vocab_parallel_kl(s_dev, t.to(dev), direction=direction, temperature=temperature, clip=clip)
        kl.sum().backward()
        assert kl.device == dev and s_dev.grad.device == dev and s_dev.grad.dtype == dtype
        err = float((kl.double().cpu() - ref.detach()).abs().max())
        gerr = _rel(s_dev.grad.float(), s_ref.grad)
        print(f"{direction} {dtype} T={temperature} clip={clip}: max |kl-ref| {err:.2e}, grad rel err {gerr:.2e}")
        assert err <= 1e-5 + 1e-5 * float(ref.abs().max())
        assert gerr < (1e-4 if dtype == torch.float32 else 4e-3)
