"""Qwen3-VL: tiny checkpoint, TP=1 parity with HF (deepstack, two image sizes), converters, refusals;
slow (torchrun): TP2 / PP2 / TP2xPP2 parity with HF, the teacher replica, a checkpoint at another
layout and, at PP2 and TP2xPP2, the in-schedule ViGOS step (tests/dist/schedule_common.py: loss
from hidden states, separate teacher) against the PP=1 step (loss from logits): loss and every
student gradient by HF name, the teacher untouched."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DIST = Path(__file__).parent / "dist"
if str(DIST) not in sys.path:
    sys.path.insert(0, str(DIST))


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    from vigos_megatron.testing.tiny_qwen3_vl import write_tiny_checkpoint

    base = tmp_path_factory.mktemp("q3")
    return {
        "untied": write_tiny_checkpoint(base / "untied", tie_word_embeddings=False, seed=0),
        "tied": write_tiny_checkpoint(base / "tied", tie_word_embeddings=True, seed=1),
    }


def test_tiny_qwen3_vl_tokenizer_processor_and_config(tiny3):
    from transformers import AutoProcessor, AutoTokenizer, Qwen3VLConfig

    from vigos_megatron.models.family import family_for_config

    d = tiny3["untied"]
    tok = AutoTokenizer.from_pretrained(d)
    cfg = Qwen3VLConfig.from_pretrained(d)
    assert len(tok) == cfg.text_config.vocab_size == 384
    for t in ("<think>", "</think>", "<|image_pad|>", "<|im_end|>"):
        assert tok.tokenize(t) == [t]
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert len(cfg.vision_config.deepstack_visual_indexes) == 2 and cfg.vision_config.depth >= 3
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # no default system message
    ip = AutoProcessor.from_pretrained(d).image_processor
    assert (ip.patch_size, ip.merge_size) == (16, 2)
    assert family_for_config(cfg).pixel_unit(cfg) == 32


@pytest.mark.parametrize("impl", ["local", "sdpa"])
def test_tp1_logits_and_vision_equal_hf(tiny3, impl):
    """Two images of different sizes in one batch; deepstack on; the whole model and the tower alone."""
    from transformers import Qwen3VLForConditionalGeneration

    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.models.stage_forward import embed_rows, image_features, language_forward, mrope_positions
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.testing.tiny_qwen3_vl import image_text_batch

    d = tiny3["untied"]
    batch = image_text_batch(d)
    assert batch["image_grid_thw"][0].tolist() != batch["image_grid_thw"][1].tolist()
    hf = Qwen3VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(**batch).logits
        ref_vis = hf.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    real = batch["attention_mask"].bool()
    with local_model_parallel():
        builder = QwenVLBuilder.from_hf(d, transformer_impl=impl)
        assert builder.provider.mrope_section == [4, 2, 2] and builder.transformer_impl == impl
        model = builder.build_from_hf(d)[0].eval()
        ids = batch["input_ids"]
        with torch.no_grad():
            feats = image_features(model, batch["pixel_values"], batch["image_grid_thw"])
            out = language_forward(model, rows=embed_rows(model, ids, feats),
                                   position_ids=mrope_positions(model, ids, batch["image_grid_thw"]))
    vis_diff = (torch.cat([f.embeds for f in feats]) - torch.cat(list(ref_vis.pooler_output))).abs().max().item()
    deep_diff = max((torch.cat([f.deepstack[k] for f in feats]) - ref_vis.deepstack_features[k]).abs().max().item()
                    for k in range(2))
    diff = (out - ref)[real].abs().max().item()
    print(f"{impl}: logits {diff:.3e} (scale {ref.abs().max():.3f}), vision {vis_diff:.3e}, deepstack {deep_diff:.3e}")
    assert diff <= 1e-5 and vis_diff <= 1e-6 and deep_diff <= 1e-6


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_converter_round_trip_is_bit_exact(tiny3, tmp_path, kind):
    from transformers import Qwen3VLForConditionalGeneration

    from vigos_megatron.convert.converters import hf_to_megatron, load_hf_state, megatron_to_hf

    hf_to_megatron(tiny3[kind], tmp_path / "run", quiet=True)
    megatron_to_hf(tmp_path / "run", tmp_path / "back", quiet=True)
    a, b = load_hf_state(tiny3[kind], canonical=False), load_hf_state(tmp_path / "back", canonical=False)
    assert sorted(a) == sorted(b) and len(a) > 90
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "back").config.tie_word_embeddings == (kind == "tied")


def test_layout_and_family_refusals(tiny3, tmp_path):
    from vigos_megatron.models.builder import ModelBuildError, QwenVLBuilder, load_hf_config
    from vigos_megatron.testing.tiny_qwen3_vl import tiny_hf_config

    # 4 layers over PP=4: the first stage would hold 1 layer, deepstack needs 2
    with pytest.raises(ModelBuildError, match=r"parallel.pp: 4 leaves 1 language-model layers .* 2 deepstack layers"):
        QwenVLBuilder.from_hf(tiny_hf_config(), pipeline_model_parallel_size=4)
    # the same rule from the configuration, before any process group (the checkpoint's config.json)
    import torch.distributed as dist

    from vigos_megatron.config.loader import ConfigError, load_config
    from vigos_megatron.config.train import PretrainConfig, validate_layout

    cfg = load_config(PretrainConfig, ROOT / "conf/qwen3_vl_2b.yaml",
                      ["run_dir=/nonexistent", f"model.hf_path={tiny3['untied']}", "parallel.tp=1", "parallel.pp=4",
                       "data.loader.shards_dir=/nonexistent", f"data.context.processor_path={tiny3['untied']}"])
    with pytest.raises(ConfigError, match=r"^parallel.pp: 4 leaves 1 language-model layers .* 2 deepstack layers"):
        validate_layout(cfg, 4)
    cfg.parallel.pp = 2
    assert validate_layout(cfg, 2).pp == 2
    # data.context's pixel bounds in Qwen3-VL's unit (32 x 32 pixels per image token), same place
    cfg.data.context.min_pixels, cfg.data.context.max_pixels = 784, 1000
    with pytest.raises(ConfigError, match=r"^data.context.max_pixels: 1000 is below one image token .*32 x 32"):
        validate_layout(cfg, 2)
    assert not dist.is_initialized()
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({"model_type": "qwen3_vl_moe"}))
    with pytest.raises(ModelBuildError, match=r"config.json: model_type 'qwen3_vl_moe': Qwen3-VL MoE .* not supported"):
        load_hf_config(moe)


def _results(out: str) -> dict:
    import re

    return dict(re.findall(r"RESULT (\w+)=(\S+)", out))


@pytest.fixture(scope="module")
def pp1_step(tiny3):
    """``step(kind)``: (teacher checkpoint, the PP=1 single-process ViGOS step of the ``kind`` student
    with it, the loss from logits), computed once per kind."""
    import schedule_common as sc

    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.testing.tiny_qwen3_vl import write_tiny_checkpoint

    cache = {}

    def step(kind: str):
        if kind not in cache:
            t0 = time.perf_counter()
            teacher = write_tiny_checkpoint(tiny3[kind].parent / f"teacher_{kind}", tie_word_embeddings=kind == "tied",
                                            seed=3 + (kind == "tied"))
            with local_model_parallel() as ps:
                ref = sc.run_step(tiny3[kind], 1, 1, ps, teacher_hf=teacher, from_hidden=False)
            assert ref["valid"] == [True, False, True, False] and min(ref["counts"]) > 0  # all three teachers
            print(f"PP=1 reference step ({kind}): {time.perf_counter() - t0:.1f}s")
            cache[kind] = teacher, ref
        return cache[kind]

    return step


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_parallel_parity_teacher_and_checkpoint_at_another_layout(torchrun, tiny3, pp1_step, tmp_path, tp, pp):
    import schedule_common as sc

    from vigos_megatron.convert.converters import hf_to_megatron

    kind = "tied" if tp * pp == 4 else "untied"
    hf_to_megatron(tiny3[kind], tmp_path / "run", quiet=True)
    step = ()  # the in-schedule step at the pipeline layouts, in the same launch
    if pp > 1:
        teacher, ref = pp1_step(kind)
        step = ("--teacher-hf", teacher, "--step-out", tmp_path / "step.pt")
    t0 = time.perf_counter()
    r = _results(torchrun("qwen3_vl_parallel.py", tp * pp, "--tp", tp, "--pp", pp, "--hf", tiny3[kind],
                          "--ckpt", tmp_path / "run", *step))
    print(f"TP={tp} PP={pp} ({time.perf_counter() - t0:.1f}s launch): {r}")
    assert float(r["parity_max_abs_diff"]) <= 1e-5
    assert float(r["vision_max_abs_diff"]) <= 1e-5 and float(r["deepstack_max_abs_diff"]) <= 1e-5
    assert float(r["teacher_vs_student_logit_diff"]) == 0.0
    assert int(r["student_params_with_grad"]) > 0 and r["teacher_params_touched"] == "0"
    assert float(r["checkpoint_vs_hf_load_logit_diff"]) == 0.0
    if step:
        res = torch.load(tmp_path / "step.pt", weights_only=False)
        assert res["world_size"] == tp * pp
        assert any("deepstack_merger" in n for n in res["grads"])  # the deepstack mergers get gradients too
        sc.compare_to_pp1(res, ref, f"Qwen3-VL step TP={tp} PP={pp} {kind}")
