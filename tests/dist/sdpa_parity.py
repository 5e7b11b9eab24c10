"""Worker: the "sdpa" layer spec vs the local spec under tensor parallelism (gloo, fp32).

Usage: torchrun --nproc_per_node=T sdpa_parity.py --tp T --hf DIR

Builds the tiny Qwen2.5-VL from DIR twice (``transformer_impl="local"`` and ``"sdpa"``), runs one
forward+backward of an image+text batch on each (loss ``sum(logits * w)``, ``w`` a fixed random
``[B, S, V]`` tensor of which each rank uses its vocabulary shard), and prints on rank 0, as
``RESULT key=value`` lines:

* ``logits_sdpa_vs_local``: max abs difference of the gathered logits;
* ``logits_sdpa_vs_hf``: the same against Hugging Face's model (fp32, eager);
* ``grad_rel_diff``: max over ranks and parameters of ``max|g_sdpa - g_local| / max|g_local|``
  (each rank's own shards); ``grad_tensors``: parameters compared on rank 0;
* ``padding_sdpa_vs_local``: a left-padded text batch with megatron's causal+padding mask
  (queries without any visible key included), max abs difference at the real positions;
  ``padding_finite``: 1 when every logit is finite.
"""

import argparse


def vocab_shard(t, rank, tp):
    v = t.size(-1) // tp
    return t[..., rank * v:(rank + 1) * v]


def run(model, kwargs, w, rank, tp):
    """(full logits gathered over TP, {name: grad}) for loss sum(logits_shard * w_shard)."""
    import torch

    from vigos_megatron.models.forward import gather_vocab_shards

    model.zero_grad(set_to_none=True)
    logits = model(**kwargs)
    (logits * vocab_shard(w, rank, tp)).sum().backward()
    full = gather_vocab_shards(logits.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return full, grads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--hf", required=True)
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from vigos_megatron.testing.distributed import destroy, init_gloo

    init_gloo(args.tp, 1)
    rank, tp = dist.get_rank(), args.tp
    from model_parallel import make_batch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.testing.tiny_qwen import special_token_ids

    def result(key, value):
        if rank == 0:
            print(f"RESULT {key}={value}", flush=True)

    batch = make_batch(args.hf)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(**batch).logits
    kwargs = {k: batch[k] for k in ("input_ids", "pixel_values", "image_grid_thw")}
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0)) / ref.numel()

    # left-padded text rows with megatron's causal+padding mask (True = masked out)
    s, lengths = 16, (16, 11)
    ids = torch.randint(0, 300, (2, s), generator=torch.Generator().manual_seed(3))
    real = torch.zeros(2, s, dtype=torch.bool)
    for r, n in enumerate(lengths):
        real[r, s - n:] = True
    ids[~real] = special_token_ids()["<|endoftext|>"]
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None] | ~real[:, None, None, :]
    pad_kwargs = {"input_ids": ids, "attention_mask": mask}
    w_pad = torch.randn(2, s, ref.size(-1), generator=torch.Generator().manual_seed(1)) / (2 * s)

    out = {}
    for impl in ("local", "sdpa"):
        builder = QwenVLBuilder.from_hf(args.hf, tensor_model_parallel_size=tp, transformer_impl=impl)
        model = builder.build_from_hf(args.hf)[0]
        core = type(model.language_model.decoder.layers[0].self_attention.core_attention).__name__
        result(f"core_attention_{impl}", core)
        out[impl] = run(model, kwargs, w, rank, tp) + run(model, pad_kwargs, w_pad, rank, tp)[:1]

    (l_logits, l_grads, l_pad), (s_logits, s_grads, s_pad) = out["local"], out["sdpa"]
    result("logits_sdpa_vs_local", f"{(s_logits - l_logits).abs().max().item():.3e}")
    result("logits_sdpa_vs_hf", f"{(s_logits - ref).abs().max().item():.3e}")
    assert l_grads.keys() == s_grads.keys()
    worst = max((s_grads[n] - g).abs().max().item() / g.abs().max().item() for n, g in l_grads.items())
    worst_t = torch.tensor([worst], dtype=torch.float64)
    dist.all_reduce(worst_t, op=dist.ReduceOp.MAX)
    result("grad_rel_diff", f"{worst_t.item():.3e}")
    result("grad_tensors", len(l_grads))
    result("padding_sdpa_vs_local", f"{(s_pad[real] - l_pad[real]).abs().max().item():.3e}")
    result("padding_finite", int(bool(torch.isfinite(s_pad).all())))
    destroy()


if __name__ == "__main__":
    main()
