"""Worker: training checkpoints of the tiny Qwen2.5-VL under TP/DP (gloo).

Usage: torchrun ... ckpt_worker.py --tp T --hf DIR --run-dir DIR --out FILE [--no-distributed-optimizer]

1. trains ``SAVE_AT`` steps, saves ``iter_<SAVE_AT>`` (save_training_checkpoint), snapshots
   this rank's parameters, optimizer tensors and next RNG draws, trains one more step;
2. builds a fresh model + optimizer in the same processes, loads the checkpoint, snapshots the
   same things, trains the same step.

Writes ``FILE.rank<r>.pt`` per rank with both snapshots and both step histories, plus (collective,
gathered over TP) the student's weights and Adam ``exp_avg`` by HF name at the checkpoint
(``hf_params``, ``hf_exp_avg``; the latter for non-distributed optimizers only).
"""

import argparse

SAVE_AT = 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-distributed-optimizer", action="store_true")
    args = ap.parse_args()

    import time

    import torch
    import torch.distributed as dist

    import ckpt_common as cc
    import schedule_common as sc
    from vigos_megatron.testing.distributed import destroy, init_gloo
    from vigos_megatron.training.checkpoint import (
        TrainState,
        load_training_checkpoint,
        optimizer_kind,
        save_training_checkpoint,
    )

    t0 = time.perf_counter()
    ps = init_gloo(args.tp, 1)
    rank, dp_rank = dist.get_rank(), ps.get_data_parallel_rank()
    distributed = not args.no_distributed_optimizer
    inputs = sc.build_inputs(args.hf)
    a = cc.build(args.hf, ps, inputs=inputs, distributed=distributed)
    res = {"kind": optimizer_kind(a.optimizer), "history_a": [], "history_b": []}
    for _ in range(SAVE_AT):
        res["history_a"].append(cc.train_step(a, ps))
    state = TrainState(step=SAVE_AT, loader={"dp_rank": dp_rank, "consumed_positions": 8 * SAVE_AT, "rank": rank})
    t_save = time.perf_counter()
    save_training_checkpoint(args.run_dir, state, student_chunks=[a.student], model=a.model, optimizer=a.optimizer,
                             scheduler=a.scheduler, hf_source_dir=args.hf)
    res["save_s"] = time.perf_counter() - t_save
    res["at_save"] = {"params": cc.params(a), "opt": cc.optimizer_state(a), "adam_step": cc.adam_step_count(a),
                      "draws": cc.draws()}
    res["hf_params"] = cc.hf_tensors(a)
    if not distributed or ps.get_data_parallel_world_size() == 1:
        res["hf_exp_avg"] = cc.hf_tensors(a, "exp_avg")
    res["history_a"].append(cc.train_step(a, ps))
    res["next_a"] = {"params": cc.params(a), "adam_step": cc.adam_step_count(a)}

    b = cc.build(args.hf, ps, inputs=inputs, distributed=distributed)
    t_load = time.perf_counter()
    loaded = load_training_checkpoint(args.run_dir, student_chunks=[b.student], model=b.model, optimizer=b.optimizer,
                                      scheduler=b.scheduler)
    res["load_s"] = time.perf_counter() - t_load
    res["train_state"] = loaded
    res["after_load"] = {"params": cc.params(b), "opt": cc.optimizer_state(b), "adam_step": cc.adam_step_count(b),
                         "draws": cc.draws(), "lr": float(b.optimizer.param_groups[0]["lr"])}
    res["history_b"].append(cc.train_step(b, ps))
    res["next_b"] = {"params": cc.params(b), "adam_step": cc.adam_step_count(b)}
    res["world_size"] = dist.get_world_size()
    res["wall_s"] = time.perf_counter() - t0
    torch.save(res, f"{args.out}.rank{rank}.pt")
    print(f"RANK {rank} done: kind {res['kind']}, save {res['save_s']:.1f}s, load {res['load_s']:.1f}s, "
          f"total {res['wall_s']:.1f}s", flush=True)
    destroy()


if __name__ == "__main__":
    main()
