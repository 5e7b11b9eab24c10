"""Benchmark: generated tokens/s of the Megatron rollout engine (KV cache, one process, TP=1).

Prints a table per batch size: end-to-end generated tokens/s, prefill time, mean decode step,
and the decode step time around token 20 and token 200 (median of steps 16-24 / 196-204: a flat
KV-cached step stays about the same; the no-cache reference row grows with the sequence).
Generation is fixed-length (stop tokens disabled) so every batch decodes the same number of steps.

* ``--preset tiny`` (default): the tiny random Qwen2.5-VL (``vigos_megatron/testing/tiny_qwen.py``)
  in fp32 on this process's device, prompts = the ViGOS student context of two synthetic images.
* ``--preset 3b``: a Qwen2.5-VL-3B-shaped random model (36 layers, hidden 2048, 16/2 heads,
  vocabulary 151,936, tied embeddings, full vision tower) in bf16; meant for one GPU. Prompts are
  random text around one 392x392 image (196 image tokens). It also reports the fraction of the
  memory-bandwidth roofline: (bytes of language-model weights + KV cache read per decode step) /
  measured copy bandwidth (``clone`` of a large tensor, read + write), over the measured mean
  decode step (printed on CUDA only: a CPU's caches make it meaningless). The static KV cache re-rotates cached keys every step (megatron-core's
  ``StaticInferenceContext`` stores un-rotated keys), traffic the roofline does not count.

    .venv/bin/python benchmarks/bench_rollout.py                       # tiny, CPU, batch 1 8 32
    .venv/bin/python benchmarks/bench_rollout.py --preset 3b           # GPU
    .venv/bin/python benchmarks/bench_rollout.py --preset 3b --layers 2 --batches 1 --new-tokens 8   # smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Qwen/Qwen2.5-VL-3B-Instruct config.json architecture values
QWEN2_5_VL_3B = dict(
    text_config=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        use_sliding_window=False, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, out_hidden_size=2048,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu",
    ),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True,
    architectures=["Qwen2_5_VLForConditionalGeneration"],
)


def tiny_setup(workdir: Path):
    """Tiny checkpoint + model + two student-context prompts (different lengths)."""
    from vigos_megatron.data.contexts import ContextEncoder
    from vigos_megatron.data.synthetic import image_bytes
    from vigos_megatron.models.qwen2_5_vl import QwenVLBuilder
    from vigos_megatron.testing.tiny_qwen import write_tiny_checkpoint

    hf_dir = write_tiny_checkpoint(workdir / "tiny")
    builder = QwenVLBuilder.from_hf(hf_dir)
    chunks = builder.build_from_hf(hf_dir)
    enc = ContextEncoder(hf_dir, ROOT / "conf" / "prompts" / "vigos.yaml", min_pixels=56 * 56, max_pixels=112 * 112,
                         max_prompt_tokens=4096, contexts=("student",))
    bases = []
    for i, (problem, w, h) in enumerate([("How many red circles are there?", 84, 56),
                                         ("What is the total length of the two sides, in centimetres?", 112, 84)]):
        rec = enc(f"k{i}", {"id": str(i), "problem": problem, "answer": "3"}, image_bytes(w, h, seed=i))
        bases.append((rec["contexts"]["student"], rec["pixel_values"], rec["image_grid_thw"]))
    return builder, chunks, bases


def large_setup(args):
    """3B-shaped random model in bf16 + two random image+text prompts."""
    from transformers import Qwen2_5_VLConfig

    from vigos_megatron.models.qwen2_5_vl import QwenVLBuilder

    kw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in QWEN2_5_VL_3B.items()}
    if args.layers:
        kw["text_config"]["num_hidden_layers"] = args.layers
    cfg = Qwen2_5_VLConfig(**kw)
    builder = QwenVLBuilder.from_hf(cfg, dtype=torch.bfloat16)
    chunks = builder.build(init_weights=True)
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 28, 28]])
    n_img = 28 * 28 // 4
    pix = torch.randn(28 * 28, 3 * 2 * 14 * 14, generator=g).to(torch.bfloat16)
    bases = []
    for plen in (args.prompt_len, args.prompt_len - 37):
        n_text = plen - n_img - 2
        text = torch.randint(0, 151643, (n_text,), generator=g)
        ids = torch.cat([text[: n_text // 2], torch.tensor([cfg.vision_start_token_id]),
                         torch.full((n_img,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                         text[n_text // 2 :]])
        bases.append((ids, pix, grid))
    return builder, chunks, bases


def copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s of ``clone`` (read + write counted) on ``device``: median of 5."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    x.fill_(1.0)
    times = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = x.clone()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del y
    return 2 * nbytes / statistics.median(times[1:])


def decode_bytes_per_step(chunks, builder, batch: int, mean_seq: float) -> tuple[int, float]:
    """(language-model weight bytes read per decode step, mean KV-cache bytes read per step)."""
    lm = chunks[0].language_model
    seen, weights = set(), 0
    for name, p in lm.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embedding.word_embeddings" in name and not lm.share_embeddings_and_output_weights:
            continue  # an embedding lookup reads B rows, not the table
        weights += p.numel() * p.element_size()
    text = builder.hf_config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    elem = next(lm.parameters()).element_size()
    kv = 2 * text.num_hidden_layers * batch * text.num_key_value_heads * head_dim * elem * mean_seq
    return weights, kv


def run(args) -> None:
    from vigos_megatron.config.sampling import SamplingConfig
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.rollout.engine import MegatronRolloutEngine, RolloutPrompt
    from vigos_megatron.runtime import describe, model_device

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, local_model_parallel():
        builder, chunks, bases = tiny_setup(Path(tmp)) if args.preset == "tiny" else large_setup(args)
        device = model_device(chunks)
        hf = builder.hf_config
        never = [-1]  # fixed-length generation: no id matches

        def engine(**kw):
            return MegatronRolloutEngine(chunks, hf_config=hf, stop_token_ids=never, pad_token_id=0, **kw)

        def prompts(b):
            return [RolloutPrompt(*bases[i % len(bases)], sample_id=i) for i in range(b)]

        cfg = SamplingConfig(max_new_tokens=args.new_tokens, max_batch_size=max(args.batches), seed=1)
        eng = engine()
        eng.generate(prompts(2), SamplingConfig(max_new_tokens=4, seed=0))  # warm-up
        bw = copy_bandwidth(device, args.copy_bytes) if device.type == "cuda" else None  # roofline: GPU only
        plen = max(b[0].numel() for b in bases)
        rows = []
        cases = [(b, True) for b in args.batches] + ([(1, False)] if args.no_cache_reference else [])
        for b, cached in cases:
            e = eng if cached else engine(use_kv_cache=False)
            t0 = time.perf_counter()
            outs = e.generate(prompts(b), cfg)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            st = e.last_stats
            steps = st.step_seconds[0]
            n = sum(o.length for o in outs)

            def around(t):
                window = steps[max(0, t - 5) : t + 4]  # steps[t-1] is step t
                return statistics.median(window) * 1e3 if len(steps) >= t + 4 else float("nan")

            row = dict(batch=b, cached=cached, tokens=n, wall=wall, tps=n / wall, prefill=st.prefill_seconds,
                       step=st.decode_seconds / max(1, len(steps)) * 1e3, s20=around(20), s200=around(200),
                       kv=st.kv_cache_bytes)
            if bw:
                w, kv = decode_bytes_per_step(chunks, builder, b, plen + args.new_tokens / 2)
                row["roofline"] = (w + kv) / bw / (row["step"] / 1e3)
                row["bytes"] = w + kv
            rows.append(row)

    name = {"tiny": "tiny Qwen2.5-VL (fp32)", "3b": "Qwen2.5-VL-3B-shaped random model (bf16)"}[args.preset]
    print(f"\n{name}; {describe()}; {args.threads} torch threads; prompts {plen} tokens max (two lengths, "
          f"left-padded), {args.new_tokens} new tokens per prompt, sampling T=1.1 top-k 20 top-p 0.95")
    if bw:
        print(f"copy bandwidth {bw / 1e9:.0f} GB/s (clone, read+write)")
    head = f"{'batch':>6}{'KV cache':>10}{'tokens/s':>11}{'prefill s':>11}{'ms/step':>9}{'ms@20':>8}{'ms@200':>8}{'KV MiB':>8}"
    print(head + (f"{'GB/step':>9}{'roofline':>10}" if bw else ""))
    for r in rows:
        line = (f"{r['batch']:>6}{'yes' if r['cached'] else 'no':>10}{r['tps']:>11.1f}{r['prefill']:>11.3f}"
                f"{r['step']:>9.2f}{r['s20']:>8.2f}{r['s200']:>8.2f}{r['kv'] / 2**20:>8.1f}")
        if bw:
            line += f"{r['bytes'] / 1e9:>9.2f}{r['roofline']:>9.1%}"
        print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "3b"], default="tiny")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512, help="3b preset: longest prompt (tokens)")
    p.add_argument("--layers", type=int, default=0, help="3b preset: override the number of layers (smoke tests)")
    p.add_argument("--copy-bytes", type=int, default=2 << 30, help="bytes copied to measure memory bandwidth")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--no-cache-reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time batch 1 without the KV cache (full recomputation every step)")
    args = p.parse_args()
    from vigos_megatron.training.console import quiet_library_logs

    quiet_library_logs()  # the platform adaptations; known library warnings not shown
    if args.preset == "3b" and not torch.cuda.is_available():
        print("note: --preset 3b is meant for a GPU; running on the CPU", file=sys.stderr)
    run(args)


if __name__ == "__main__":
    main()
