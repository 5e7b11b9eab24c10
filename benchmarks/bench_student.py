"""Benchmark: forward+backward of the student chunk vs Hugging Face's Qwen2.5-VL (``sdpa``).

One process, one random HF checkpoint, the same text tokens and the same output gradient for
every path:

* ``hf``: ``Qwen2_5_VLForConditionalGeneration`` with ``attn_implementation="sdpa"``;
* ``megatron/<impl>``: the student chunk built by ``QwenVLBuilder`` with
  ``transformer_impl=<impl>`` (``sdpa``, ``local``, ``auto``, ``transformer_engine``) from the
  checkpoint the HF model was saved to (megatron-bridge's weight mappings), TP=PP=1.

A step is ``logits = model(input_ids)`` then ``logits.backward(g)`` with a fixed random ``g``
(what the vocabulary-parallel KL hands back); gradients are dropped between steps. The paths
run one after the other, each alone on the device (the previous one is deleted first), so the
peak memory of each is its own: weights, gradients and activations (CUDA:
``max_memory_allocated``, which also counts the input ids and the output gradient ``g``, the same
for every path; CPU: resident-set high-water mark above the level before the steps, so there it
excludes the weights).

Model FLOPs per step (causal attention counted half; no recomputation)::

    3 * [2 * tokens * (L * (H*(nq+2*nkv)*d + nq*d*H + 3*H*F) + H*V) + L * 2 * B * S^2 * nq * d]

    .venv/bin/python benchmarks/bench_student.py                    # CPU: tiny model smoke test
    python benchmarks/bench_student.py --model 3b --batch 2 --seq 2048   # GPU: Qwen2.5-VL-3B-shaped
    python benchmarks/bench_student.py --model 3b --impls sdpa local --steps 10
    python benchmarks/bench_student.py --model 3b --impls sdpa --profile 20   # + where the time goes

``--profile K`` adds, after each path's timed steps, one step under ``torch.profiler``: the K
operators with the most self time on the device (CUDA kernels; CPU time on the CPU), so the
remaining costs of a path (norms, rotary, SwiGLU, copies) show without another run;
``--profile-dir`` also writes each path's Chrome trace there.

On a GPU the default is the 3B-shaped random config (36 layers, hidden 2048, 16 heads / 2 kv
heads, intermediate 11008, vocabulary 151,936) in bf16 with 2 x 2048 tokens; on the CPU the
tiny config in fp32 with 2 x 64 tokens.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GIB = 2**30
#: dense bf16 peak (TFLOP/s) by device-name fragment, for the "% of peak" column
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0}


# --------------------------------------------------------------------------- config and FLOPs


def make_hf_config(model: str, layers: int | None):
    """The HF config: ``tiny`` (tests' tiny Qwen2.5-VL) or ``3b`` (published 3B shapes)."""
    if layers is not None and layers < 1:
        raise SystemExit(f"--layers: must be >= 1, got {layers}")
    if model == "tiny":
        from vigos_megatron.testing.tiny_qwen import tiny_hf_config

        cfg = tiny_hf_config()
        if layers is not None:
            text = {k: v for k, v in cfg.text_config.to_dict().items() if k != "layer_types"}
            cfg = tiny_hf_config(text_config=dict(text, num_hidden_layers=layers))
        return cfg
    if model == "3b":
        from transformers import Qwen2_5_VLConfig

        from vigos_megatron.models.hf_configs import qwen2_5_vl_values

        values = qwen2_5_vl_values("3b")
        if layers is not None:
            values["text_config"]["num_hidden_layers"] = layers
            values["text_config"]["max_window_layers"] = min(layers, values["text_config"]["max_window_layers"])
        return Qwen2_5_VLConfig(**values)
    raise SystemExit(f"--model: unknown {model!r} (tiny, 3b)")


def model_flops_per_step(text, batch: int, seq: int) -> float:
    """Forward+backward matmul FLOPs of the language model (formula in the module docstring)."""
    h, f, v, n_layers = text.hidden_size, text.intermediate_size, text.vocab_size, text.num_hidden_layers
    nq, nkv = text.num_attention_heads, text.num_key_value_heads
    d = h // nq
    tokens = batch * seq
    per_layer = h * (nq + 2 * nkv) * d + nq * d * h + 3 * h * f
    dense = 2 * tokens * (n_layers * per_layer + h * v)
    attention = n_layers * 2 * batch * seq * seq * nq * d  # QK^T and PV, causal half: 2 * (2 B S^2 nq d) / 2
    return 3.0 * (dense + attention)


def text_token_limit(cfg) -> int:
    """Token ids below every special/vision token id (plain text tokens)."""
    ids = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
           cfg.text_config.bos_token_id, cfg.text_config.eos_token_id]
    return min(i for i in ids if i is not None)


# --------------------------------------------------------------------------- measurement


class Meter:
    """Synchronised wall time and peak memory of a block of steps on ``device``."""

    def __init__(self, device):
        self.device = device

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        import torch

        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = 0
        else:
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self._base = _proc_status("VmRSS")

    def peak_bytes(self) -> int:
        import torch

        self.sync()
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status("VmHWM") - self._base


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def time_steps(step, meter: Meter, warmup: int, steps: int) -> tuple[float, int, object]:
    """(median seconds per step, peak bytes over the timed steps, logits of the first step)."""
    first = step()
    first = first.detach().to("cpu", copy=True)
    for _ in range(max(0, warmup - 1)):
        step()
    meter.reset_peak()
    times = []
    for _ in range(steps):
        meter.sync()
        t0 = time.perf_counter()
        step()
        meter.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), meter.peak_bytes(), first


def profile_step(step, meter: Meter, name: str, top: int, trace_dir: str | None) -> None:
    """Print the ``top`` operators of one ``step()`` by self device time (CUDA) or self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = meter.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    meter.sync()
    with profile(activities=activities, record_shapes=False) as prof:
        step()
        meter.sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\n--- profile of one step: {name} (top {top} by {key}) ---")
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60))
    if trace_dir:
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        path = Path(trace_dir) / f"trace_{name.replace('/', '_').replace(' ', '')}.json"
        prof.export_chrome_trace(str(path))
        print(f"trace: {path}")


def make_step(model, forward, grad_out):
    """One training step: forward to logits, ``logits.backward(grad_out)``, gradients dropped."""

    def step():
        model.zero_grad(set_to_none=True)
        logits = forward()
        logits.backward(grad_out.to(logits.dtype))
        return logits

    return step


# --------------------------------------------------------------------------- the two paths


def run_hf(hf, ids, grad_out, meter, args):
    import torch

    hf.train()
    mm = torch.zeros_like(ids, dtype=torch.int32)  # all text (0 = text, 1 = image, 2 = video)
    step = make_step(hf, lambda: hf(input_ids=ids, mm_token_type_ids=mm, use_cache=False).logits, grad_out)
    result = time_steps(step, meter, args.warmup, args.steps)
    if args.profile:
        profile_step(step, meter, "hf (sdpa)", args.profile, args.profile_dir)
    return result


def run_megatron(hf_dir, impl, dtype, ids, grad_out, meter, args):
    from vigos_megatron.models.builder import QwenVLBuilder

    builder = QwenVLBuilder.from_hf(hf_dir, dtype=dtype, transformer_impl=impl)
    model = builder.build_from_hf(hf_dir)[0]
    model.train()
    step = make_step(model, lambda: model(input_ids=ids, pixel_values=None, image_grid_thw=None), grad_out)
    try:
        result = time_steps(step, meter, args.warmup, args.steps)
        if args.profile:
            profile_step(step, meter, f"megatron/{builder.transformer_impl}", args.profile, args.profile_dir)
        return builder.transformer_impl, result
    finally:
        del model, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "3b"], help="default: 3b on a GPU, tiny on the CPU")
    p.add_argument("--layers", type=int, help="override the number of language-model layers")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, help="tokens per row; default 2048 on a GPU, 64 on the CPU")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--impls", nargs="+", default=["sdpa", "local"],
                   help="megatron transformer_impl values to measure (auto, local, sdpa, transformer_engine)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on a GPU, 3 on the CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, help="device peak for the %% column (default: by device name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="after each path's timed steps, profile one step and print its top K operators")
    p.add_argument("--profile-dir", help="with --profile: also write each path's Chrome trace here")
    args = p.parse_args()
    if args.profile < 0:
        raise SystemExit(f"--profile: must be >= 0, got {args.profile}")

    import torch

    from vigos_megatron import runtime
    from vigos_megatron.training.console import quiet_library_logs

    quiet_library_logs()  # the platform adaptations; known library warnings not shown
    from vigos_megatron.startup import local_model_parallel

    with local_model_parallel():
        device = runtime.compute_device()
        cuda = device.type == "cuda"
        args.model = args.model or ("3b" if cuda else "tiny")
        args.seq = args.seq or (2048 if cuda else 64)
        args.steps = args.steps or (10 if cuda else 3)
        dtype = getattr(torch, "bfloat16" if args.dtype == "auto" and cuda else
                        "float32" if args.dtype == "auto" else args.dtype)
        if not cuda:
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
        cfg = make_hf_config(args.model, args.layers)
        text = cfg.text_config
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items()
                                         if cuda and k in torch.cuda.get_device_name(device)), None)
        flops = model_flops_per_step(text, args.batch, args.seq)
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, text_token_limit(cfg), (args.batch, args.seq), generator=g).to(device)
        grad_out = (torch.randn(args.batch, args.seq, text.vocab_size, generator=g) / (args.batch * args.seq)).to(
            device=device, dtype=dtype)  # resident throughout: counted in every path's peak alike
        meter = Meter(device)

        from transformers import Qwen2_5_VLForConditionalGeneration

        rows = []
        with tempfile.TemporaryDirectory(prefix="bench_student_") as tmp:
            hf_dir = Path(tmp) / "hf"
            torch.manual_seed(args.seed)
            with torch.device(device):
                hf = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
            hf.save_pretrained(hf_dir)  # the megatron paths load exactly these weights
            t, mem, ref = run_hf(hf, ids, grad_out, meter, args)
            rows.append(("hf (sdpa)", t, mem, 0.0))
            del hf
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            for impl in args.impls:
                resolved, (t, mem, logits) = run_megatron(hf_dir, impl, dtype, ids, grad_out, meter, args)
                diff = (logits.float() - ref.float()).abs().max().item()
                rows.append((f"megatron/{resolved}", t, mem, diff))
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()

    import importlib.metadata as md

    te = "TE usable" if _te_usable() else "no TE"
    where = f"{torch.cuda.get_device_name(device)}" if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{where}; torch {torch.__version__}, megatron-core {md.version('megatron-core')}, "
          f"megatron-bridge {md.version('megatron-bridge')}, transformers {md.version('transformers')}, {te}")
    print(f"model {args.model} ({text.num_hidden_layers} layers, hidden {text.hidden_size}, "
          f"{text.num_attention_heads}/{text.num_key_value_heads} heads, ffn {text.intermediate_size}, "
          f"vocab {text.vocab_size}), {str(dtype).removeprefix('torch.')}, forward+backward of "
          f"{args.batch} x {args.seq} text tokens, median of {args.steps} steps after {args.warmup} warm-up; "
          f"{flops / 1e12:.4g} model TFLOP per step")
    mem_kind, mem_unit = ("peak GiB", GIB) if cuda else ("peak RSS MiB*", 2**20)
    print(f"{'path':<28}{'ms/step':>10}{'TFLOP/s':>10}{'% peak':>8}{mem_kind:>14}{'time/HF':>9}{'mem/HF':>8}"
          f"{'max|logit-HF|':>15}")
    hf_t, hf_mem = rows[0][1], rows[0][2]
    for name, t, mem, diff in rows:
        tf = flops / t / 1e12
        pct = f"{100 * tf / peak:.0f}%" if peak else "-"
        print(f"{name:<28}{t * 1e3:>10.1f}{tf:>10.3g}{pct:>8}{mem / mem_unit:>14.1f}{t / hf_t:>8.2f}x"
              f"{mem / max(1, hf_mem):>7.2f}x{diff:>15.2e}")
    if not cuda:
        print("* CPU: resident-set growth during the timed steps (activations and gradients, not the weights)")


def _te_usable() -> bool:
    from vigos_megatron.models.builder import transformer_engine_available

    return transformer_engine_available()


if __name__ == "__main__":
    main()
