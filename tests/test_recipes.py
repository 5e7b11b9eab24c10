"""Recipes and the memory estimate: parameter counts against meta-device builds, activation terms
against what autograd really saves, recipe -> YAML -> validation, the shipped training configs."""

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("3b", "7b", "32b", "72b")


def saved_bytes(fn, exclude) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs (storages in ``exclude`` skipped)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def hf_config(name: str):
    """The HF config of a known model name ("7b", "qwen2_5_vl_7b", "qwen3_vl_8b")."""
    from vigos_megatron.models.hf_configs import qwen2_5_vl_config, qwen3_vl_config

    if name.startswith("qwen3_vl_"):
        return qwen3_vl_config(name.removeprefix("qwen3_vl_"))
    return qwen2_5_vl_config(name.removeprefix("qwen2_5_vl_"))


def write_hf_config(name: str, directory: Path) -> Path:
    hf_config(name).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- parameter counts


def test_published_configs_param_counts_match_hf_megatron_and_estimate():
    """Every size: the estimate's count == HF's meta model == megatron's meta build == the published total."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vigos_megatron.models.hf_configs import QWEN2_5_VL_SIZES, qwen2_5_vl_config
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder, param_count
    from vigos_megatron.recipes.memory import ModelShape

    with local_model_parallel():
        for size in SIZES:
            cfg = qwen2_5_vl_config(size)
            _, published, _ = QWEN2_5_VL_SIZES[size]
            with torch.device("meta"):
                hf = Qwen2_5_VLForConditionalGeneration(cfg)
            hf_count = sum(p.numel() for p in hf.parameters())  # tied weights counted once
            del hf
            meg = param_count(QwenVLBuilder.from_hf(cfg, dtype=torch.bfloat16).build(meta_device=True))
            est = ModelShape.from_hf(cfg).param_count()
            assert est == meg == hf_count == published, (size, est, meg, hf_count, published)


def test_published_config_values():
    from vigos_megatron.models.hf_configs import qwen2_5_vl_config

    expect = {  # size: vocab, hidden, ffn, layers, heads, kv heads, tied, vision intermediate
        "3b": (151936, 2048, 11008, 36, 16, 2, True, 3420),
        "7b": (152064, 3584, 18944, 28, 28, 4, False, 3420),
        "32b": (152064, 5120, 27648, 64, 40, 8, False, 3456),
        "72b": (152064, 8192, 29568, 80, 64, 8, False, 3456),
    }
    for size, (v, h, f, n, a, g, tied, vi) in expect.items():
        c = qwen2_5_vl_config(size)
        t, vis = c.text_config, c.vision_config
        assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
                t.num_key_value_heads, bool(c.tie_word_embeddings)) == (v, h, f, n, a, g, tied)
        assert (vis.depth, vis.hidden_size, vis.intermediate_size, vis.out_hidden_size) == (32, 1280, vi, h)
        assert t.hidden_size // t.num_attention_heads == 128


def test_qwen3_vl_param_counts_match_hf_megatron_and_published():
    """Qwen3-VL 2B/4B/8B/32B: the estimate's count == HF's meta model == megatron's meta build == the
    published total; the vision tower (ViT + merger + deepstack mergers) too; tied embeddings
    counted once (2B, 4B)."""
    from transformers import Qwen3VLForConditionalGeneration

    from vigos_megatron.models.builder import QwenVLBuilder, param_count
    from vigos_megatron.models.hf_configs import QWEN3_VL_SIZES, qwen3_vl_config
    from vigos_megatron.recipes.memory import ModelShape
    from vigos_megatron.startup import local_model_parallel

    for size, (_, published, _) in QWEN3_VL_SIZES.items():
        cfg = qwen3_vl_config(size)
        with torch.device("meta"):
            hf = Qwen3VLForConditionalGeneration(cfg)
        hf_count = sum(p.numel() for p in hf.parameters())
        hf_vision = sum(p.numel() for p in hf.model.visual.parameters())
        shape = ModelShape.from_hf(cfg)
        assert shape == dataclasses.replace(ModelShape.from_hf(f"qwen3_vl_{size}"), name="")
        with local_model_parallel():
            meg = QwenVLBuilder.from_hf(cfg, dtype=torch.bfloat16).build(meta_device=True)
            meg_count = param_count(meg)
            meg_vision = sum(p.numel() for p in meg[0].vision_model.parameters())
        assert shape.param_count() == hf_count == meg_count == published, (size, shape.param_count(), hf_count,
                                                                          meg_count, published)
        assert meg_vision == hf_vision
        assert shape.vision.params() == hf_vision, (size, shape.vision.params(), hf_vision)
        assert shape.tie_word_embeddings == (size in ("2b", "4b"))
        # TP shards every matrix of the ViT: per rank well under the whole tower, the replicated part kept
        assert shape.vision.params() / 8 < shape.vision.rank_params(8) < shape.vision.params() / 4


def test_qwen3_vl_config_values():
    from vigos_megatron.models.hf_configs import qwen3_vl_config

    expect = {  # size: hidden, ffn, layers, heads, tied, ViT depth, ViT hidden, ViT intermediate, deepstack
        "2b": (2048, 6144, 28, 16, True, 24, 1024, 4096, [5, 11, 17]),
        "4b": (2560, 9728, 36, 32, True, 24, 1024, 4096, [5, 11, 17]),
        "8b": (4096, 12288, 36, 32, False, 27, 1152, 4304, [8, 16, 24]),
        "32b": (5120, 25600, 64, 64, False, 27, 1152, 4304, [8, 16, 24]),
    }
    for size, (h, f, n, a, tied, vd, vh, vi, deep) in expect.items():
        c = qwen3_vl_config(size)
        t, v = c.text_config, c.vision_config
        assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
                bool(c.tie_word_embeddings)) == (h, f, n, a, tied)
        assert (t.vocab_size, t.num_key_value_heads, t.head_dim, t.rope_parameters["rope_theta"]) == (151936, 8, 128, 5e6)
        assert t.rope_parameters["mrope_section"] == [24, 20, 20]
        assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == (vd, vh, vi, 16, h)
        assert (v.patch_size, v.spatial_merge_size, v.num_position_embeddings) == (16, 2, 2304)
        assert v.deepstack_visual_indexes == deep


def test_qwen3_vl_layout_rules_and_pixel_unit():
    """Deepstack needs its layers on the first stage; Qwen3-VL's image token is 32 x 32 pixels."""
    from vigos_megatron.recipes.memory import LayoutError, ModelShape, Workload, estimate_memory
    from vigos_megatron.recipes.qwen3_vl import qwen3_vl_2b

    with pytest.raises(LayoutError, match=r"parallel.pp: 14 leaves 2 language-model layers.*3 deepstack.*pp <= 9"):
        estimate_memory("qwen3_vl_2b", tp=1, pp=14, dp=1)
    estimate_memory("qwen3_vl_2b", tp=1, pp=7, dp=1)
    with pytest.raises(LayoutError, match=r"num_key_value_heads=8"):
        estimate_memory("qwen3_vl_8b", tp=16, pp=1, dp=1)
    assert ModelShape.from_hf("qwen3_vl_8b").vision.pixel_unit == 32 and ModelShape.from_hf("7b").vision.pixel_unit == 28
    cfg = qwen3_vl_2b(8)
    assert (cfg.data.context.min_pixels, cfg.data.context.max_pixels) == (4 * 32 * 32, 16384 * 32 * 32)
    assert Workload.from_config(cfg, "qwen3_vl_2b").image_tokens == 16384
    # deepstack features show up on the first stage only
    est = estimate_memory("qwen3_vl_8b", tp=4, pp=2, dp=4, rollout_batch_size=4)
    first = [k for k in est.train if k.startswith("deepstack")]
    assert est.stage == 0 or first == []


# --------------------------------------------------------------------------- activation terms, measured


@pytest.mark.parametrize("spec", ["local", "sdpa"])
def test_language_activation_terms_equal_saved_tensors(spec):
    """The tiny model in bf16 on CPU: saved bytes == the estimate's terms, at every recompute mode,
    two lengths and two batch sizes (the S^2 terms of the unfused attention included)."""
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.recipes.memory import ModelShape, stage_activation_bytes
    from vigos_megatron.testing.tiny_qwen import tiny_hf_config

    cfg = tiny_hf_config()
    shape = ModelShape.from_hf(cfg)
    gen = torch.Generator().manual_seed(0)
    with local_model_parallel():
        for rc in ("none", "selective", "full"):
            model = QwenVLBuilder.from_hf(cfg, dtype=torch.bfloat16, transformer_impl=spec, recompute=rc).build()[0]
            model.train()
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            for seq in (64, 128):
                for rows in (1, 2):
                    ids = torch.randint(0, 300, (rows, seq), generator=gen)
                    got = saved_bytes(lambda: model(input_ids=ids, attention_mask=None), params)
                    est = stage_activation_bytes(shape, tp=1, pp=1, stage=0, rows=rows, seq=seq, spec=spec, recompute=rc)
                    assert got == est, (spec, rc, seq, rows, got, est)


def test_vision_activation_terms_equal_saved_tensors():
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.recipes.memory import ModelShape
    from vigos_megatron.testing.tiny_qwen import tiny_hf_config

    cfg = tiny_hf_config()
    vis = ModelShape.from_hf(cfg).vision
    gen = torch.Generator().manual_seed(0)
    with local_model_parallel():
        model = QwenVLBuilder.from_hf(cfg, dtype=torch.bfloat16, transformer_impl="local").build()[0]
        tower = model.visual
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        for checkpointed in (False, True):
            if checkpointed:
                tower.gradient_checkpointing_enable()
            tower.train()
            for grid in ([[1, 8, 8]], [[1, 8, 8], [1, 4, 8]], [[1, 16, 8]]):
                g = torch.tensor(grid)
                patches = int(g.prod(-1).sum())
                pixels = torch.randn(patches, vis.patch_dim, generator=gen).to(torch.bfloat16)
                got = saved_bytes(lambda: tower(pixels, grid_thw=g), params)
                assert got == patches * vis.stored_bytes_per_patch(checkpointed), (checkpointed, grid, got)


def _tiny_qwen3_vl_configs():
    """The tiny Qwen3-VL config and a variant with other head counts, widths, depth and deepstack layers."""
    from vigos_megatron.testing.tiny_qwen3_vl import tiny_hf_config

    base = tiny_hf_config()
    text = dict(base.text_config.to_dict(), num_attention_heads=8, num_key_value_heads=4, intermediate_size=96)
    vision = dict(base.vision_config.to_dict(), depth=4, hidden_size=48, num_heads=3, intermediate_size=80,
                  deepstack_visual_indexes=[0, 1, 2])
    return base, tiny_hf_config(text_config=text, vision_config=vision)


@pytest.mark.parametrize("spec", ["local", "sdpa"])
def test_qwen3_vl_activation_terms_equal_saved_tensors(spec):
    """Qwen3-VL in bf16 on CPU, two tiny shapes: the language model's saved bytes (QK-norm; the
    local spec's fp32 attention path) and the Megatron ViT's (deepstack mergers; full
    recomputation) == the estimate's terms."""
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.recipes.memory import ModelShape, stage_activation_bytes
    from vigos_megatron.startup import local_model_parallel

    gen = torch.Generator().manual_seed(0)
    with local_model_parallel():
        for cfg in _tiny_qwen3_vl_configs():
            shape = ModelShape.from_hf(cfg)
            vis = shape.vision
            for rc in ("none", "selective", "full"):
                model = QwenVLBuilder.from_hf(cfg, dtype=torch.bfloat16, transformer_impl=spec, recompute=rc).build()[0]
                model.train()
                params = {p.untyped_storage().data_ptr() for p in model.parameters()}
                for seq, rows in ((64, 1), (128, 2)):
                    ids = torch.randint(0, 300, (rows, seq), generator=gen)
                    pos = torch.arange(seq).expand(3, rows, seq)
                    got = saved_bytes(lambda: model(input_ids=ids, position_ids=pos, attention_mask=None), params)
                    est = stage_activation_bytes(shape, tp=1, pp=1, stage=0, rows=rows, seq=seq, spec=spec, recompute=rc)
                    assert got == est, (spec, rc, seq, rows, got, est)
                if rc == "selective":
                    continue
                for grid in ([[1, 8, 8]], [[1, 8, 8], [1, 4, 8]]):
                    g = torch.tensor(grid)
                    patches = int(g.prod(-1).sum())
                    pixels = torch.randn(patches, vis.patch_dim, generator=gen).to(torch.bfloat16)
                    got = saved_bytes(lambda: model.vision_model(hidden_states=pixels, grid_thw=g), params)
                    assert got == patches * vis.stored_bytes_per_patch(rc == "full"), (spec, rc, grid, got)


@pytest.mark.slow
def test_per_rank_params_and_activations_at_tp2_pp2(torchrun):
    """4 gloo ranks: Qwen2.5-VL-3B and Qwen3-VL-2B per-rank parameters (meta build; tied output copy
    on the last stage; Qwen3-VL's ViT split over TP) and the tiny model's saved bytes per stage at
    TP=2 equal the estimate's."""
    out = torchrun("recipes_layout_check.py", 4, "--tp", 2, "--pp", 2)
    results = re.findall(r"RESULT (r\d_\w+)=(\d+)/(\d+)", out)
    keys = {k for k, _, _ in results}
    for r in range(4):
        for k in ("params_3b_language", "params_3b_vision", "params_qwen3_vl_2b_language", "params_qwen3_vl_2b_vision",
                  "act_local_none", "act_sdpa_none", "act_sdpa_full"):
            assert f"r{r}_{k}" in keys, (r, k, out[-3000:])
    bad = [(k, got, est) for k, got, est in results if got != est]
    assert not bad, bad


# --------------------------------------------------------------------------- the estimate's arithmetic


def test_static_and_rollout_terms_by_hand():
    from vigos_megatron.recipes.memory import GIB, ModelShape, estimate_memory

    m = ModelShape.from_hf("7b")
    est = estimate_memory("7b", tp=2, pp=1, dp=4, rollout_batch_size=8, prompt_tokens=32768, completion_tokens=4096)
    lang, vis = m.stage_params(2, 1, 0)
    n = lang + vis
    assert est.rank_params == (lang, vis)
    assert vis == m.vision.params() == 676_550_144  # replicated on every TP rank
    assert est.static_bytes == 2 * n + 4 * n + 12 * n // 4 + 2 * n
    kv = [v for k, v in est.rollout.items() if k.startswith("rollout KV cache")]
    assert kv == [8 * 36864 * 28 * 2 * (4 // 2) * 128 * 2]
    assert est.peak_bytes == est.static_bytes + max(est.train_bytes, est.rollout_bytes)
    # bf16 gradients and no optimizer sharding
    est2 = estimate_memory("7b", tp=2, pp=1, dp=4, grad_reduce_in_fp32=False, distributed_optimizer=False)
    assert est2.static_bytes == 2 * n + 2 * n + 12 * n + 2 * n
    # a frozen vision tower has no gradient or optimizer state
    est3 = estimate_memory("7b", tp=2, pp=1, dp=4, freeze_vision=True)
    assert est3.static_bytes == 2 * n + 4 * lang + 12 * lang // 4 + 2 * n
    # the logits path (loss.from_hidden false) reads fp32 logits (default): 4 bytes per entry of the
    # student and teacher rows, the student's fp32 gradient and its bf16 copy, against 2 + 2 bytes
    # rounded to bf16 (ViGOS: one student and one teacher row per completion token); from hidden
    # states (the default) the loss forms fp32 chunks whatever logits_dtype says
    kw = dict(tp=2, pp=1, dp=4, rollout_batch_size=8, prompt_tokens=32768, completion_tokens=4096)
    fp32 = estimate_memory("7b", **kw, loss_from_hidden=False)
    rounded = estimate_memory("7b", **kw, loss_from_hidden=False, logits_dtype="model")
    assert fp32.train_bytes - rounded.train_bytes == (6 * 4096 + 2 * 4096) * (m.vocab_size // 2)
    assert estimate_memory("7b", **kw, logits_dtype="model").train_bytes == est.train_bytes
    # recomputation is what makes 36,864-token streams fit: without it the activations explode
    none = estimate_memory("7b", tp=2, pp=1, dp=4, recompute="none", vision_recompute=False)
    assert none.train_bytes > 5 * est.train_bytes
    assert est.table().count("\n") > 10 and f"{est.peak_gib:.2f}" in est.table()
    assert 0 < est.peak_bytes / GIB < 200


def test_pipeline_stages_and_model_count():
    from vigos_megatron.recipes.memory import ModelShape, estimate_memory

    for size in ("3b", "7b"):
        m = ModelShape.from_hf(size)
        est = estimate_memory(size, tp=2, pp=2, dp=2, rollout_batch_size=4)
        assert est.model_params == m.param_count()
        assert len(est.stage_peaks) == 2 and est.stage_peaks[est.stage] == est.peak_bytes
        # the sum over one rank of each stage, times TP for the sharded part, gives the model back
        per_stage = [m.stage_params(2, 2, s) for s in range(2)]
        assert per_stage[1][1] == 0 and per_stage[0][1] == m.vision.params()


def test_layout_errors_name_the_option():
    from vigos_megatron.recipes.memory import LayoutError, estimate_memory

    with pytest.raises(LayoutError, match=r"parallel.tp: 3 does not divide the model's num_attention_heads=28"):
        estimate_memory("7b", tp=3, pp=1, dp=1)
    with pytest.raises(LayoutError, match=r"parallel.tp: 7 does not divide the model's num_key_value_heads=4"):
        estimate_memory("7b", tp=7, pp=1, dp=1)
    with pytest.raises(LayoutError, match=r"parallel.pp: 3 does not divide the model's num_hidden_layers=28"):
        estimate_memory("7b", tp=1, pp=3, dp=1)
    with pytest.raises(LayoutError, match=r"global_batch_size: 32 does not split over dp=3"):
        estimate_memory("7b", tp=1, pp=1, dp=3)
    with pytest.raises(LayoutError, match=r"recompute"):
        estimate_memory("7b", tp=1, pp=1, dp=1, recompute="partial")
    with pytest.raises(LayoutError, match=r"neither a known model"):
        estimate_memory("9b", tp=1, pp=1, dp=1)


# --------------------------------------------------------------------------- recipes


def test_stated_layouts_are_what_the_estimate_chooses():
    """Each recipe's stated smallest GPU count and layouts == the layout search, up to dp = 32."""
    from vigos_megatron.recipes.memory import WORLD_SIZES
    from vigos_megatron.recipes.registry import RECIPES, STATED_LAYOUTS, min_gpus, plan

    for name in RECIPES:
        computed = {}
        for n in WORLD_SIZES:
            est = plan(name, n)
            if est is None:
                assert not computed, f"{name}: fits on {sorted(computed)} but not on {n}"
                continue
            computed[n] = (est.tp, est.pp, est.dp, est.workload.rollout_batch_size)
            if est.dp == 32:  # the global batch: more GPUs add no data parallelism
                break
        assert computed == STATED_LAYOUTS[name], (name, computed)
        assert f"Fits on {min_gpus(name)} GPUs" in RECIPES[name].__doc__


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b", "qwen2_5_vl_72b",
                                  "qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b", "qwen3_vl_32b"])
def test_recipe_yaml_validates_like_pretrain_vigos(name, tmp_path):
    """recipe -> YAML -> load_config + validate_layout (what examples/pretrain_vigos.py runs before
    any process group) at the smallest GPU count and at every stated count; the estimate from the
    loaded config matches the recipe's layout and the model's parameter count."""
    from vigos_megatron.config.loader import load_config, to_yaml
    from vigos_megatron.config.train import PretrainConfig, validate_layout
    from vigos_megatron.recipes.memory import ModelShape, estimate_for_config
    from vigos_megatron.recipes.registry import MODELS, RECIPES, STATED_LAYOUTS

    size = MODELS[name].model
    hf = write_hf_config(size, tmp_path / "hf")
    for n, (tp, pp, dp, batch) in STATED_LAYOUTS[name].items():
        cfg = RECIPES[name](n, hf_path=str(hf), shards_dir=str(tmp_path / "shards"), run_dir=str(tmp_path / "run"))
        path = tmp_path / f"{name}_{n}.yaml"
        path.write_text(to_yaml(cfg))
        loaded = load_config(PretrainConfig, path)
        layout = validate_layout(loaded, n)
        assert (layout.tp, layout.pp, layout.dp) == (tp, pp, dp)
        assert loaded.sampling.max_batch_size == batch and loaded.data.loader.batch_size == 32 // dp
        est = estimate_for_config(loaded, n)
        assert est.fits() and est.model_params == ModelShape.from_hf(size).param_count()
        assert (loaded.optimizer.lr, loaded.optimizer.clip_grad, loaded.optimizer.decay_style) == (5e-6, 0.1, "linear")
        assert (loaded.sampling.temperature, loaded.sampling.top_p, loaded.sampling.top_k) == (1.1, 0.95, 20)
        assert (loaded.data.context.max_prompt_tokens, loaded.sampling.max_new_tokens) == (32768, 4096)
        assert loaded.train.global_batch_size == 32 and loaded.train.steps == 47_600 // 32


def test_7b_recipe_param_count_equals_meta_build(tmp_path):
    """The 7B recipe's estimate counts exactly the parameters of the model built on the meta device
    from the recipe's own ``model.hf_path``."""
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder, param_count
    from vigos_megatron.recipes.memory import estimate_for_config
    from vigos_megatron.recipes.qwen2_5_vl import qwen2_5_vl_7b

    hf = write_hf_config("7b", tmp_path / "hf")
    cfg = qwen2_5_vl_7b(8, hf_path=str(hf), shards_dir=str(tmp_path / "shards"))
    est = estimate_for_config(cfg, 8)
    with local_model_parallel():
        chunks = QwenVLBuilder.from_hf(cfg.model.hf_path, dtype=torch.bfloat16).build(meta_device=True)
        assert all(p.is_meta for p in chunks[0].parameters())
        n = param_count(chunks)
    assert est.model_params == n == 8_292_166_656


def test_recipe_refuses_too_few_gpus_and_reads_the_manifest(tmp_path):
    from vigos_megatron.config.loader import ConfigError
    from vigos_megatron.recipes.qwen2_5_vl import qwen2_5_vl_7b
    from vigos_megatron.recipes.registry import get_recipe

    with pytest.raises(ConfigError, match=r"qwen2_5_vl_72b: does not fit on 64 x 80 GB GPUs.*smallest count that fits is 512"):
        get_recipe("qwen2_5_vl_72b")(64)
    with pytest.raises(ConfigError, match=r"unknown recipe 'qwen2_5_vl_2b'.*qwen2_5_vl_3b"):
        get_recipe("qwen2_5_vl_2b")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"counts": {"converted": 47_000}}))
    assert qwen2_5_vl_7b(8, shards_dir=str(shards)).train.steps == 47_000 // 32
    assert qwen2_5_vl_7b(8, shards_dir=str(shards), epochs=2).train.steps == 2 * 47_000 // 32
    # shorter caps need fewer GPUs: the estimate follows the config
    small = qwen2_5_vl_7b(8)
    small.data.context.max_prompt_tokens = 8192
    from vigos_megatron.recipes.memory import choose_layout, Workload

    assert choose_layout("7b", 4, Workload.from_config(small, "7b"), tune_rollout_batch=True) is not None


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b"])
def test_shipped_training_configs_equal_the_recipes(name):
    """conf/<name>.yaml (composed from conf/model, conf/loss, conf/data) == the recipe at 8 GPUs."""
    from vigos_megatron.config.loader import load_config, to_yaml
    from vigos_megatron.config.train import PretrainConfig, validate_layout
    from vigos_megatron.recipes.registry import RECIPES

    path = ROOT / "conf" / f"{name}.yaml"
    assert "compose:" in path.read_text()
    shipped = load_config(PretrainConfig, path)
    assert to_yaml(shipped) == to_yaml(RECIPES[name](8, dataset_size=47_600))
    validate_layout(shipped, 8)
    # the layout comment states the estimate the file's layout gets
    from vigos_megatron.recipes.memory import estimate_for_config

    est = estimate_for_config(shipped, 8, model=name)
    assert f"peak = static + max(training, rollout)              {est.peak_gib:.2f}" in path.read_text()
    assert math.isclose(est.peak_gib, round(est.peak_gib, 2), abs_tol=0.005)


def test_loss_from_hidden_keeps_no_logits():
    """The last stage's loss from hidden states (VGS rows, 3B shape, TP=1): it grows only by the
    scored rows' hidden states between 4,096 and 8,192-token completions, and at 8,192 it is under
    1/8 of the logits path's (the output-weight gradient counted in both)."""
    from vigos_megatron.recipes.memory import Workload, loss_bytes

    h, v = 2048, 151936

    def total(from_hidden, tokens):
        return sum(loss_bytes(Workload(loss_from_hidden=from_hidden), h, v, 2 * tokens, 2 * tokens).values())

    assert total(True, 8192) - total(True, 4096) == (4 * 4096 * h * 2 + 2 * 4096 * h * 6)
    assert total(True, 8192) * 8 < total(False, 8192)
