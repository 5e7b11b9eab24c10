"""Qwen3-VL (single process): tiny checkpoint, TP=1 parity with HF (deepstack, two image sizes), converters, refusals."""

import json

import pytest
import torch


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
    with pytest.raises(ModelBuildError, match=r"parallel.pp=4: the first pipeline stage would hold 1 .* deepstack"):
        QwenVLBuilder.from_hf(tiny_hf_config(), pipeline_model_parallel_size=4)
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({"model_type": "qwen3_vl_moe"}))
    with pytest.raises(ModelBuildError, match=r"config.json: model_type 'qwen3_vl_moe': Qwen3-VL MoE .* not supported"):
        load_hf_config(moe)


def _results(out: str) -> dict:
    import re

    return dict(re.findall(r"RESULT (\w+)=(\S+)", out))


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_parallel_parity_teacher_and_checkpoint_at_another_layout(torchrun, tiny3, tmp_path, tp, pp):
    from vigos_megatron.convert.converters import hf_to_megatron

    hf_to_megatron(tiny3["tied" if tp * pp == 4 else "untied"], tmp_path / "run", quiet=True)
    hf = tiny3["tied" if tp * pp == 4 else "untied"]
    r = _results(torchrun("qwen3_vl_parallel.py", tp * pp, "--tp", tp, "--pp", pp, "--hf", hf, "--ckpt", tmp_path / "run"))
    print(f"TP={tp} PP={pp}: {r}")
    assert float(r["parity_max_abs_diff"]) <= 1e-5
    assert float(r["vision_max_abs_diff"]) <= 1e-5 and float(r["deepstack_max_abs_diff"]) <= 1e-5
    assert float(r["teacher_vs_student_logit_diff"]) == 0.0
    assert int(r["student_params_with_grad"]) > 0 and r["teacher_params_touched"] == "0"
    assert float(r["checkpoint_vs_hf_load_logit_diff"]) == 0.0
