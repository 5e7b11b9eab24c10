"""Worker: the rollout engine under TP/PP (gloo) - greedy == HF generate, seeded sampling, sampler parity.

Usage: torchrun ... rollout_parity.py --tp T --pp P --hf DIR [--prefill-max-tokens N] [--decode-mode M]

Every rank builds its chunks, generates the two student prompts of ``rollout_common`` (greedy, then
each of ``SAMPLING_CASES``) with an extra stop token that ends one row early (so finished rows
are compacted out mid-generation), and checks that all ranks of the model-parallel group return
the same completions. Rank 0 prints ``RESULT key=value`` lines (the test parses them):

* ``greedy_matches_hf``: 1 if greedy equals Hugging Face ``generate`` (one prompt at a time);
* ``ranks_identical``: 1 if every rank returned the same completions in every case;
* ``sampled_<case>``: the sampled ids (JSON), compared by the test with the TP=1 engine;
* ``sampler_mismatches``: rows where the vocabulary-parallel sampler on random sharded logits
  chose another token than the one-shard sampler on the full logits (all sampling settings).
"""

import argparse
import json


def sampler_mismatches(tp_group, tp_rank: int, tp: int) -> int:
    import torch

    from vigos_megatron.config.sampling import SamplingConfig
    from vigos_megatron.rollout.sampling import sample_next_tokens

    g = torch.Generator().manual_seed(0)
    full = torch.randn(6, 384, generator=g) * 3
    full[0, 5] = full[0, 300] = full[0].max() + 1  # a greedy tie across shards: lowest id wins
    flat = torch.randn(2, 384, generator=g) * 0.1  # nucleus wider than the first 64 candidates
    vl = 384 // tp
    bad = 0
    for logits in (full, flat):
        shard = logits[:, tp_rank * vl : (tp_rank + 1) * vl]
        ids = torch.arange(logits.shape[0]) + 100
        pos = torch.full_like(ids, 5)
        for cfg in (SamplingConfig(greedy=True), SamplingConfig(seed=3), SamplingConfig(top_k=0, top_p=0.9, seed=4),
                    SamplingConfig(top_k=0, top_p=1.0, seed=5), SamplingConfig(top_k=7, top_p=1.0, seed=6)):
            kw = dict(sampling=cfg, step=2, sample_ids=ids, positions=pos)
            got = sample_next_tokens(shard, vocab_start=tp_rank * vl, tp_group=tp_group, **kw)
            want = sample_next_tokens(logits, vocab_start=0, tp_group=None, **kw)
            bad += int((got != want).sum())
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--prefill-max-tokens", type=int, default=32768)
    ap.add_argument("--decode-mode", default="dynamic")
    args = ap.parse_args()

    import torch.distributed as dist
    from rollout_common import (
        SAMPLING_CASES, SAMPLING_STEP, early_stop_token, hf_greedy, sampling_config, stop_ids, student_prompts,
        truncate_at,
    )

    from vigos_megatron.startup import destroy_distributed, init_distributed

    ps = init_distributed(args.tp, args.pp)
    rank = dist.get_rank()
    from vigos_megatron.config.sampling import SamplingConfig
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.rollout.engine import MegatronRolloutEngine

    def result(key, value):
        if rank == 0:
            print(f"RESULT {key}={value}", flush=True)

    prompts = student_prompts(args.hf)
    box = [hf_greedy(args.hf, prompts) if rank == 0 else None]  # the HF reference once, on rank 0
    dist.broadcast_object_list(box, src=0)
    ref = box[0]
    stops = stop_ids(args.hf) + [early_stop_token(ref)]
    builder = QwenVLBuilder.from_hf(args.hf, tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    chunks = builder.build_from_hf(args.hf)
    engine = MegatronRolloutEngine(chunks, hf_config=builder.hf_config, stop_token_ids=stops, pad_token_id=stops[1],
                                   prefill_max_tokens=args.prefill_max_tokens, decode_mode=args.decode_mode)

    outputs = {}
    greedy = engine.generate(prompts, SamplingConfig(greedy=True, max_new_tokens=16))
    outputs["greedy"] = [o.token_ids.tolist() for o in greedy]
    for name in SAMPLING_CASES:
        outs = engine.generate(prompts, sampling_config(name), step=SAMPLING_STEP)
        outputs[name] = [[o.token_ids.tolist(), o.finish_reason] for o in outs]
    result("greedy_matches_hf", int(outputs["greedy"] == [truncate_at(r, stops) for r in ref]))
    result("finish_reasons", ",".join(o.finish_reason for o in greedy))
    mine = json.dumps(outputs, sort_keys=True)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    result("ranks_identical", int(all(o == mine for o in everyone)))
    for name in SAMPLING_CASES:
        result(f"sampled_{name}", json.dumps(outputs[name], separators=(",", ":")))

    tp_group = ps.get_tensor_model_parallel_group()
    bad = sampler_mismatches(tp_group if args.tp > 1 else None, ps.get_tensor_model_parallel_rank(), args.tp)
    result("sampler_mismatches", bad)
    destroy_distributed()


if __name__ == "__main__":
    main()
