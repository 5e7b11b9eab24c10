"""Worker: one ViGOS training step of the student+teacher stage under TP/PP (gloo).

Usage: torchrun ... schedule_parity.py --tp T --pp P --hf DIR --out FILE [--teacher-hf DIR] [--logits]

Runs :func:`schedule_common.run_step` (megatron schedule, DDP, ``finalize_model_grads``, a plain
SGD step) and, on rank 0, saves ``{"loss", "grads" (HF name -> full float64 gradient),
"checks" (summed over ranks), ...}`` to FILE for the test to compare with PP=1.
"""

import argparse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--teacher-hf", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--logits", action="store_true", help="the loss from logits (default: from hidden states)")
    args = ap.parse_args()

    from schedule_common import run_step, save_step_result
    from vigos_megatron.testing.distributed import destroy, init_gloo

    ps = init_gloo(args.tp, args.pp)
    save_step_result(run_step(args.hf, args.tp, args.pp, ps, teacher_hf=args.teacher_hf, from_hidden=not args.logits),
                     args.out)
    destroy()


if __name__ == "__main__":
    main()
