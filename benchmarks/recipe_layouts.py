"""The smallest 80 GB layout of each recipe at given prompt / completion lengths (memory estimate).

For every recipe (default: all of :data:`vigos_megatron.recipes.registry.RECIPES`) and every
``--lengths`` pair, the recipe's config with ``data.context.max_prompt_tokens`` and
``sampling.max_new_tokens`` replaced (the largest image fills the prompt up to qwen-vl-utils'
16,384 tokens), the layout search of :func:`vigos_megatron.recipes.common.plan` over 1, 2, 4, 8,
16, ... GPUs; prints the smallest GPU count that fits, its ``tp x pp x dp``, rollout batch and
peak GiB per GPU, and the model's parameter count.

    .venv/bin/python benchmarks/recipe_layouts.py                                   # VGS paper + model card
    .venv/bin/python benchmarks/recipe_layouts.py --recipes qwen3_vl_8b --lengths 8192:1024
"""

from __future__ import annotations

import argparse


def smallest(rm, prompt: int, completion: int):
    from vigos_megatron.recipes.common import base_config, plan
    from vigos_megatron.recipes.memory import WORLD_SIZES

    cfg = base_config(rm, hf_path="unused", run_dir="unused", shards_dir="unused")
    cfg.data.context.max_prompt_tokens = prompt
    cfg.sampling.max_new_tokens = completion
    return next((est for n in WORLD_SIZES if (est := plan(rm, n, cfg)) is not None), None)


def main(argv=None) -> int:
    from vigos_megatron.recipes.memory import ModelShape
    from vigos_megatron.recipes.registry import MODELS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="*", default=list(MODELS), help="recipe names (default: all)")
    ap.add_argument("--lengths", nargs="*", default=["16384:2048", "32768:4096"],
                    help="prompt:completion token pairs (default: the VGS paper's and the ViGOS model card's)")
    args = ap.parse_args(argv)
    pairs = [tuple(int(x) for x in s.split(":")) for s in args.lengths]
    head = f"{'recipe':<16}{'parameters':>16}" + "".join(f"  {f'{p}+{c}':<30}" for p, c in pairs)
    print(head)
    print("-" * len(head))
    for name in args.recipes:
        rm = MODELS[name]
        cells = []
        for p, c in pairs:
            est = smallest(rm, p, c)
            cells.append("does not fit" if est is None else
                         f"{est.tp * est.pp * est.dp:>4} GPUs {est.tp}x{est.pp}x{est.dp} b={est.workload.rollout_batch_size:<2} "
                         f"{est.peak_gib:5.1f} GiB")
        print(f"{name:<16}{ModelShape.from_hf(rm.model).param_count():>16,}" + "".join(f"  {c:<30}" for c in cells))
    print("(tp x pp x dp, rollout batch b, peak per GPU; 80 GB cards: 79 GiB usable - 5 GiB reserve)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
