"""Benchmark: generated tokens/s of the Megatron rollout engine beside Hugging Face ``generate``.

Both generators run in this process on the same weights (one HF checkpoint written to a
temporary directory: megatron-bridge loads it into the engine's model, ``transformers`` into
``Qwen2_5_VLForConditionalGeneration`` with ``attn_implementation="sdpa"``) and the same prompts,
greedy, fixed length (stop tokens disabled), one warm-up each. Per batch size the table gives
end-to-end generated tokens/s (prefill included; best of ``--repeat`` runs, the two alternating)
of both and their ratio (engine / HF); the prefill time (engine: its prefill phase; HF: a
``generate`` of one token) and the mean decode step of both (HF: the rest of its wall time over
the remaining tokens) with the step ratio (HF / engine); how many rows produced HF's tokens.

* ``--preset tiny`` (default): the tiny random Qwen2.5-VL (``vigos_megatron/testing/tiny_qwen.py``),
  prompts = the ViGOS student context of two synthetic images (two lengths, left-padded).
* ``--preset small``: the tiny config scaled up (text hidden 512, 8 layers, 8/2 heads,
  intermediate 1,536, mrope section [8, 16, 8], vision out 512, the tiny tokenizer's
  vocabulary of 384 unless ``--vocab``), one image+text prompt of ``--prompt-len`` tokens
  (default 435: 196 image tokens of a 392x392 image, random text around them).
* ``--preset 3b``: Qwen2.5-VL-3B-shaped random model (36 layers, hidden 2048, 16/2 heads,
  vocabulary 151,936, tied embeddings, full vision tower) in bf16; meant for one GPU, with the
  fraction of the memory-bandwidth roofline: (language-model weight bytes + KV-cache bytes read
  per decode step) / measured copy bandwidth over the mean decode step (CUDA only).

Each of ``--decode-modes`` (the engine's ``decode_mode``) gets its rows: on CUDA by default
"graphs" (static shapes per batch bucket replayed from CUDA graphs, with the captures of the
timed call and their time), "static" (the same shapes eagerly: graphs against eager at the same
buckets) and "dynamic" (exact shapes, eager).

``--clock cpu`` times everything (both generators, the engine's prefill and decode steps, the copy
bandwidth) with this process's CPU time instead of the wall clock: on a shared, oversubscribed
machine the wall clock mostly measures the other processes (one thread: CPU time is the time the
run would take alone, up to cache and memory-bandwidth contention).

``--sweep-batch B`` adds the prefix sweep: one generation of ``--sweep-tokens`` + 4 tokens at
batch ``B``; median decode step around completion tokens 20, 200 and ``--sweep-tokens``; the
growth from token 20 against the extra KV-cache bytes read at the measured copy bandwidth.

    .venv/bin/python benchmarks/bench_rollout.py --preset small --new-tokens 64            # CPU
    .venv/bin/python benchmarks/bench_rollout.py --preset small --batches 32 --sweep-batch 32 --sweep-tokens 2000
    .venv/bin/python benchmarks/bench_rollout.py --preset 3b --new-tokens 128               # GPU
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

#: the "small" preset: the tiny config's tokenizer and vision tower, a larger language model
SMALL_TEXT = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1536, max_position_embeddings=8192,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 16, 8]})


def hf_config_for(args):
    """The ``Qwen2_5_VLConfig`` of the preset."""
    from transformers import Qwen2_5_VLConfig

    from vigos_megatron.testing.tiny_qwen import tiny_hf_config

    if args.preset == "tiny":
        return tiny_hf_config()
    if args.preset == "small":
        cfg = tiny_hf_config()
        text, vision = cfg.text_config.to_dict(), cfg.vision_config.to_dict()
        text.pop("layer_types", None)  # derived from the number of layers
        text.update(SMALL_TEXT)
        if args.vocab:
            text["vocab_size"] = args.vocab
        vision["out_hidden_size"] = SMALL_TEXT["hidden_size"]
        return tiny_hf_config(text_config=text, vision_config=vision)
    kw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in QWEN2_5_VL_3B.items()}
    if args.layers:
        kw["text_config"]["num_hidden_layers"] = args.layers
    return Qwen2_5_VLConfig(**kw)


def write_checkpoint(cfg, out: Path, dtype) -> Path:
    """Random HF weights (seed 0) for ``cfg`` saved to ``out`` (the tiny preset's tokenizer files too)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vigos_megatron.testing.tiny_qwen import write_tiny_processor

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype)
    model.config.dtype = str(dtype).removeprefix("torch.")
    model.save_pretrained(out, safe_serialization=True)
    write_tiny_processor(out)
    return out


def student_prompts(hf_dir: Path):
    """Two ViGOS student contexts (different lengths) of the tiny tokenizer."""
    from vigos_megatron.data.contexts import ContextEncoder
    from vigos_megatron.data.synthetic import image_bytes

    enc = ContextEncoder(hf_dir, ROOT / "conf" / "prompts" / "vigos.yaml", min_pixels=56 * 56, max_pixels=112 * 112,
                         max_prompt_tokens=4096, contexts=("student",))
    bases = []
    for i, (problem, w, h) in enumerate([("How many red circles are there?", 84, 56),
                                         ("What is the total length of the two sides, in centimetres?", 112, 84)]):
        rec = enc(f"k{i}", {"id": str(i), "problem": problem, "answer": "3"}, image_bytes(w, h, seed=i))
        bases.append((rec["contexts"]["student"], rec["pixel_values"], rec["image_grid_thw"]))
    return bases


def image_text_prompts(cfg, lengths: list[int], text_vocab: int, dtype):
    """Random text around one 392x392 image (28x28 patches, 196 image tokens) per length."""
    g = torch.Generator().manual_seed(0)
    grid = torch.tensor([[1, 28, 28]])
    n_img = 28 * 28 // 4
    pix = torch.randn(28 * 28, 3 * 2 * 14 * 14, generator=g).to(dtype)
    bases = []
    for plen in lengths:
        n_text = plen - n_img - 2
        text = torch.randint(0, text_vocab, (n_text,), generator=g)
        ids = torch.cat([text[: n_text // 2], torch.tensor([cfg.vision_start_token_id]),
                         torch.full((n_img,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                         text[n_text // 2 :]])
        bases.append((ids, pix, grid))
    return bases


def copy_bandwidth(device, nbytes: int, clock=time.perf_counter) -> float:
    """Bytes/s of ``copy_`` between two preallocated, already touched tensors of ``nbytes`` (read +
    write counted) on ``device``: median of 5, timed with ``clock``."""
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.zeros_like(x)
    times = []
    for _ in range(6):
        sync(device)
        t0 = clock()
        y.copy_(x)
        sync(device)
        times.append(clock() - t0)
    return 2 * nbytes / statistics.median(times[1:])


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def kv_bytes_per_column(cfg, batch: int, elem: int) -> int:
    """KV-cache bytes of one cache column over every layer at ``batch`` rows (K and V)."""
    text = cfg.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * batch * text.num_key_value_heads * head_dim * elem


def weight_bytes(chunks) -> int:
    """Language-model weight bytes read per decode step (an untied embedding table is not read)."""
    lm = chunks[0].language_model
    seen, total = set(), 0
    for name, p in lm.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embedding.word_embeddings" in name and not lm.share_embeddings_and_output_weights:
            continue
        total += p.numel() * p.element_size()
    return total


def hf_generate(hf, bases, batch: int, new_tokens: int, pad_id: int) -> list[list[int]]:
    """HF greedy ``generate`` of ``batch`` prompts (left-padded), fixed length: new ids per row."""
    rows = [bases[i % len(bases)] for i in range(batch)]
    plen = max(r[0].numel() for r in rows)
    ids = torch.full((batch, plen), pad_id, dtype=torch.int64)
    mask = torch.zeros((batch, plen), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, plen - r[0].numel():] = r[0]
        mask[i, plen - r[0].numel():] = 1
    dev = hf.device
    kw = dict(input_ids=ids.to(dev), attention_mask=mask.to(dev),
              mm_token_type_ids=(ids == hf.config.image_token_id).to(torch.int).to(dev),
              pixel_values=torch.cat([r[1] for r in rows]).to(dev, hf.dtype),
              image_grid_thw=torch.cat([r[2] for r in rows]).to(dev))
    out = hf.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=pad_id)
    return out[:, plen:].tolist()


def run(args) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vigos_megatron.config.sampling import SamplingConfig
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.rollout import cpu_attention, cpu_linear
    from vigos_megatron.rollout.engine import MegatronRolloutEngine, RolloutPrompt
    from vigos_megatron.runtime import describe, model_device
    from vigos_megatron.startup import local_model_parallel

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.preset == "3b" else torch.float32
    cfg = hf_config_for(args)
    text_vocab = cfg.text_config.bos_token_id  # ordinary tokens: the special ids start at <|endoftext|>
    with tempfile.TemporaryDirectory() as tmp, local_model_parallel():
        hf_dir = write_checkpoint(cfg, Path(tmp) / "hf", dtype)
        builder = QwenVLBuilder.from_hf(hf_dir, dtype=dtype)
        chunks = builder.build_from_hf(hf_dir)
        device = model_device(chunks)
        if args.preset == "tiny":
            bases = student_prompts(hf_dir)
        else:
            lengths = [args.prompt_len] if args.preset == "small" else [args.prompt_len, args.prompt_len - 37]
            bases = image_text_prompts(cfg, lengths, text_vocab, dtype)
        hf = None
        if args.hf:
            hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa")
            hf = hf.to(device).eval()
        never = [-1]  # fixed-length generation: no id matches

        def prompts(b):
            return [RolloutPrompt(*bases[i % len(bases)], sample_id=i) for i in range(b)]

        modes = args.decode_modes or (["graphs", "static", "dynamic"] if device.type == "cuda" else ["dynamic"])
        clock = {"wall": time.perf_counter, "cpu": time.process_time}[args.clock]
        engines = {}
        for mode in modes:
            engines[mode] = eng = MegatronRolloutEngine(chunks, hf_config=builder.hf_config, stop_token_ids=never,
                                                        pad_token_id=0, decode_mode=mode)
            eng.clock = clock
            eng.generate(prompts(2), SamplingConfig(greedy=True, max_new_tokens=4))  # warm-up
        greedy = SamplingConfig(greedy=True, max_new_tokens=args.new_tokens, max_batch_size=max(args.batches))
        if hf is not None:
            hf_generate(hf, bases, 2, 4, 0)
        plen = max(b[0].numel() for b in bases)
        rows = []
        for b in args.batches:
            row = dict(batch=b, hf_tps=0.0, modes={m: dict(tps=0.0) for m in modes})
            for _ in range(args.repeat):  # best of --repeat, the engine's modes and HF alternating
                for mode, eng in engines.items():
                    sync(device)
                    t0 = clock()
                    outs = eng.generate(prompts(b), greedy)
                    sync(device)
                    wall = clock() - t0
                    st, r = eng.last_stats, row["modes"][mode]
                    n = sum(o.length for o in outs)
                    if n / wall > r["tps"]:
                        r.update(tps=n / wall, prefill=st.prefill_seconds, kv=st.kv_cache_bytes, outs=outs,
                                 step=st.decode_seconds / max(1, len(st.step_seconds[0])) * 1e3,
                                 captures=st.graph_captures, capture_s=st.capture_seconds)
                if hf is not None:
                    t0 = clock()
                    ref = hf_generate(hf, bases, b, args.new_tokens, 0)
                    sync(device)
                    hf_wall = clock() - t0
                    t0 = clock()
                    hf_generate(hf, bases, b, 1, 0)  # prefill and first token only
                    sync(device)
                    hf_prefill = clock() - t0
                    if b * args.new_tokens / hf_wall > row["hf_tps"]:
                        row.update(hf_tps=b * args.new_tokens / hf_wall, hf_prefill=hf_prefill,
                                   hf_step=(hf_wall - hf_prefill) / max(1, args.new_tokens - 1) * 1e3)
                    for r in row["modes"].values():
                        r["same"] = sum(o.token_ids.tolist() == x for o, x in zip(r["outs"], ref))
            if device.type == "cuda":
                bw = copy_bandwidth(device, args.copy_bytes, clock)
                moved = weight_bytes(chunks) + kv_bytes_per_column(cfg, b, 2) * (plen + args.new_tokens / 2)
                for r in row["modes"].values():
                    r["roofline"] = moved / bw / (r["step"] / 1e3)
            rows.append(row)
        sweep = None
        if args.sweep_batch:
            eng = engines[modes[0]]
            n_new = args.sweep_tokens + 4
            cfg_s = SamplingConfig(greedy=True, max_new_tokens=n_new, max_batch_size=args.sweep_batch)
            eng.generate(prompts(args.sweep_batch), cfg_s)
            steps = eng.last_stats.step_seconds[0]
            bw = copy_bandwidth(device, args.copy_bytes, clock)

            def around(t):  # steps[t - 1] is the step that feeds completion token t
                return statistics.median(steps[max(0, t - 5) : t + 4])

            marks = sorted({t for t in (20, 200, args.sweep_tokens) if t <= args.sweep_tokens})
            extra = kv_bytes_per_column(cfg, args.sweep_batch, next(chunks[0].parameters()).element_size())
            extra *= args.sweep_tokens - 20
            sweep = dict(ms={t: around(t) * 1e3 for t in marks}, bw=bw, extra=extra)

    name = {"tiny": "tiny Qwen2.5-VL (fp32)", "small": "small Qwen2.5-VL (fp32, hidden 512, 8 layers)",
            "3b": "Qwen2.5-VL-3B-shaped random model (bf16)"}[args.preset]
    cpu = device.type == "cpu"
    attention = "C kernel" if cpu and cpu_attention.kernel() is not None else "batched GEMMs"
    linears = "C kernel" if cpu and cpu_linear.kernel() is not None else ("oneDNN or torch" if cpu else "torch")
    print(f"\n{name}, vocabulary {cfg.text_config.vocab_size}; {describe()}; {args.threads} torch threads; "
          f"decode attention: {attention}; linears: {linears}; "
          f"prompts {sorted({b[0].numel() for b in bases})} tokens (image+text), "
          f"{args.new_tokens} new tokens, greedy; {args.clock} clock")
    cols = [("batch", 6, lambda row, mode, r: row["batch"]), ("decode", 8, lambda row, mode, r: mode),
            ("engine tok/s", 14, lambda row, mode, r: f"{r['tps']:.1f}")]
    if args.hf:
        cols += [("HF tok/s", 10, lambda row, mode, r: f"{row['hf_tps']:.1f}"),
                 ("ratio", 7, lambda row, mode, r: f"{r['tps'] / row['hf_tps']:.2f}")]
    cols.append(("prefill s", 11, lambda row, mode, r: f"{r['prefill']:.3f}"))
    if args.hf:
        cols.append(("HF", 7, lambda row, mode, r: f"{row['hf_prefill']:.2f}"))
    cols.append(("ms/step", 9, lambda row, mode, r: f"{r['step']:.2f}"))
    if args.hf:
        cols += [("HF", 8, lambda row, mode, r: f"{row['hf_step']:.2f}"),
                 ("ratio", 7, lambda row, mode, r: f"{row['hf_step'] / r['step']:.2f}")]
    cols.append(("KV MiB", 8, lambda row, mode, r: f"{r['kv'] / 2**20:.1f}"))
    if args.hf:
        cols.append(("= HF", 7, lambda row, mode, r: f"{r['same']}/{row['batch']}"))
    if device.type == "cuda":
        cols.append(("roofline", 10, lambda row, mode, r: f"{r['roofline']:.1%}"))
    if "graphs" in modes:
        cols += [("captures", 10, lambda row, mode, r: r["captures"]),
                 ("s", 7, lambda row, mode, r: f"{r['capture_s']:.2f}")]
    print("".join(f"{title:>{width}}" for title, width, _ in cols))
    for row in rows:
        for mode, r in row["modes"].items():
            print("".join(f"{value(row, mode, r):>{width}}" for _, width, value in cols))
    if sweep:
        ms = sweep["ms"]
        growth = ms[args.sweep_tokens] - ms[20]
        bound = 1.3 * sweep["extra"] / sweep["bw"] * 1e3
        print(f"\nprefix sweep, batch {args.sweep_batch} (median decode step around completion token t, ms): "
              + ", ".join(f"t={t}: {v:.2f}" for t, v in ms.items()))
        print(f"growth t=20 -> {args.sweep_tokens}: {growth:.2f} ms; extra KV read {sweep['extra'] / 1e6:.1f} MB at "
              f"copy bandwidth {sweep['bw'] / 1e9:.1f} GB/s -> 1.3 x {bound / 1.3:.2f} = {bound:.2f} ms "
              f"({'within' if growth <= bound else 'above'} the bound)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "small", "3b"], default="tiny")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=0, help="small / 3b presets: longest prompt (default 435 / 512)")
    p.add_argument("--vocab", type=int, default=0, help="small preset: vocabulary size (default the tiny 384)")
    p.add_argument("--layers", type=int, default=0, help="3b preset: override the number of layers (smoke tests)")
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                   help="time Hugging Face generate on the same weights and prompts")
    p.add_argument("--repeat", type=int, default=1, help="best of this many runs per batch size (noisy machines)")
    p.add_argument("--sweep-batch", type=int, default=0, help="prefix sweep at this batch size (0: none)")
    p.add_argument("--sweep-tokens", type=int, default=2000)
    p.add_argument("--copy-bytes", type=int, default=512 << 20, help="bytes copied to measure memory bandwidth")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (steadier on a shared, oversubscribed machine)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--decode-modes", nargs="+", choices=["dynamic", "static", "graphs"],
                   help="the engine's decode modes to time, each beside HF (default: graphs, static and dynamic "
                        "on CUDA, dynamic elsewhere); the prefix sweep uses the first")
    args = p.parse_args()
    if not args.prompt_len:
        args.prompt_len = 435 if args.preset == "small" else 512
    from vigos_megatron.training.console import quiet_library_logs

    quiet_library_logs()  # the platform adaptations; known library warnings not shown
    if args.preset == "3b" and not torch.cuda.is_available():
        print("note: --preset 3b is meant for a GPU; running on the CPU", file=sys.stderr)
    run(args)


if __name__ == "__main__":
    main()
