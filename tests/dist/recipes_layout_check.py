"""Worker: the memory estimate's per-rank numbers against real builds at TP x PP (gloo).

Usage: torchrun --nproc_per_node 4 recipes_layout_check.py --tp 2 --pp 2

Every rank prints ``RESULT r<rank>_<key>=<measured>/<estimated>`` lines (the test compares them):

* ``params_{3b,qwen3_vl_2b}_{language,vision}``: parameters of this rank's chunk of Qwen2.5-VL-3B
  (replicated HF tower) and Qwen3-VL-2B (TP-sharded ViT with deepstack mergers; both with tied
  embeddings: the last stage holds the output-layer copy) built on the meta device, vs
  :meth:`ModelShape.stage_params`;
* ``act_<spec>_<recompute>``: bytes autograd saves (parameters and the received stage input
  excluded) in one bf16 forward of this rank's stage of the tiny model, vs the estimate's per-layer
  terms at this TP.
"""

import argparse


def saved_bytes(fn, exclude):
    import torch

    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, required=True)
    ap.add_argument("--pp", type=int, required=True)
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from vigos_megatron.testing.distributed import destroy, init_gloo

    init_gloo(args.tp, args.pp)
    from megatron.core import parallel_state as ps

    from vigos_megatron.models.hf_configs import qwen2_5_vl_config, qwen3_vl_config
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.recipes.memory import ModelShape, stage_activation_bytes
    from vigos_megatron.testing.tiny_qwen import tiny_hf_config

    rank = dist.get_rank()
    stage = ps.get_pipeline_model_parallel_rank()
    out = []
    for size, hf in (("3b", qwen2_5_vl_config("3b")), ("qwen3_vl_2b", qwen3_vl_config("2b"))):
        chunk = QwenVLBuilder.from_hf(hf, tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                      dtype=torch.bfloat16).build(meta_device=True)[0]
        vision = sum(p.numel() for n, p in chunk.named_parameters() if n.startswith(("visual.", "vision_model.")))
        language = sum(p.numel() for p in chunk.parameters()) - vision
        lang_est, vis_est = ModelShape.from_hf(hf).stage_params(args.tp, args.pp, stage)
        out += [f"params_{size}_language={language}/{lang_est}", f"params_{size}_vision={vision}/{vis_est}"]
        del chunk

    cfg = tiny_hf_config()
    shape = ModelShape.from_hf(cfg)
    h = shape.hidden_size
    first = ps.is_pipeline_first_stage()
    b, s = 2, 64
    tok = b * s
    for spec, rc in (("local", "none"), ("sdpa", "none"), ("sdpa", "full")):
        model = QwenVLBuilder.from_hf(cfg, tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                      dtype=torch.bfloat16, transformer_impl=spec, recompute=rc).build()[0]
        model.train()
        exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 300, (b, s), generator=gen)
        received = None
        if not first:
            received = torch.randn(s, b, h, generator=gen, dtype=torch.bfloat16).requires_grad_()
            exclude.add(received.untyped_storage().data_ptr())
        model.set_input_tensor(received)
        got = saved_bytes(lambda: model(input_ids=ids, attention_mask=None), exclude)
        est = stage_activation_bytes(shape, tp=args.tp, pp=args.pp, stage=stage, rows=b, seq=s, spec=spec,
                                     recompute=rc)
        out.append(f"act_{spec}_{rc}={got}/{est}")
        del model
    for line in out:
        print(f"RESULT r{rank}_{line}", flush=True)
    dist.barrier()
    destroy()


if __name__ == "__main__":
    main()
