"""Qwen2.5-VL construction (single process): tiny checkpoint, TP=1 parity, config checks, 7B on meta."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from vigos_megatron.testing.tiny_qwen import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf")


def test_tiny_tokenizer_processor_and_config(tiny_dir):
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLConfig

    from vigos_megatron.testing.tiny_qwen import QWEN_SPECIAL_TOKENS, TINY_VOCAB_SIZE

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = Qwen2_5_VLConfig.from_pretrained(tiny_dir)
    assert len(tok) <= TINY_VOCAB_SIZE == cfg.text_config.vocab_size and TINY_VOCAB_SIZE % 128 == 0
    for t in QWEN_SPECIAL_TOKENS:
        assert tok.tokenize(t) == [t]
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.rope_parameters["mrope_section"] == [4, 2, 2]
    for s in ("<description>a</description>", "<think>b</think>", "\\boxed{3}"):
        assert tok.decode(tok(s)["input_ids"]) == s
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert chat.endswith("<|im_start|>assistant\n")
    proc = AutoProcessor.from_pretrained(tiny_dir)
    ip = proc.image_processor
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)


def test_tp1_logit_parity_and_mrope_from_config(tiny_dir):
    from model_parallel import make_batch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vigos_megatron.models.forward import chunk_forward
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder

    batch = make_batch(tiny_dir)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        ref = hf(**batch).logits
    with local_model_parallel():
        builder = QwenVLBuilder.from_hf(tiny_dir)
        assert builder.provider.mrope_section == [4, 2, 2]  # bridge 0.6.2 would keep [16, 24, 24]
        assert builder.provider.vocab_size == 384 and not builder.provider.should_pad_vocab
        model = builder.build_from_hf(tiny_dir)[0].eval()
        with torch.no_grad():
            out = chunk_forward(model, {k: batch[k] for k in ("input_ids", "pixel_values", "image_grid_thw")})
    diff = (out.cpu() - ref).abs().max().item()
    print(f"TP=1 max abs logit diff {diff:.3e}")
    assert out.shape == ref.shape and diff <= 1e-5


def test_layout_errors_are_clear(tiny_dir, tmp_path):
    from vigos_megatron.config.loader import ConfigError, load_config
    from vigos_megatron.config.model import ModelConfig
    from vigos_megatron.models.builder import ModelBuildError, QwenVLBuilder, check_vocab_divisible
    from vigos_megatron.testing.tiny_qwen import tiny_hf_config

    with pytest.raises(ModelBuildError, match="vocab_size 151937 is not divisible by tensor_model_parallel_size 2"):
        check_vocab_divisible(151937, 2)
    check_vocab_divisible(152064, 128)
    with pytest.raises(ModelBuildError, match="not divisible by tensor_model_parallel_size 3"):
        QwenVLBuilder.from_hf(tiny_hf_config(), tensor_model_parallel_size=3)
    with pytest.raises(ModelBuildError, match="vocab_size 400 is not divisible"):
        QwenVLBuilder.from_hf(tiny_hf_config(text_config=dict(tiny_hf_config().text_config.to_dict(), vocab_size=400)),
                              tensor_model_parallel_size=32)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelBuildError, match="model_type is 'llama'; supported: 'qwen2_5_vl', 'qwen3_vl'"):
        QwenVLBuilder.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="transformer_impl"):
        load_config(ModelConfig, None, ["transformer_impl=cuda"])
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        load_config(ModelConfig, None, ["tensor_model_parallel_size=0"])
    root = Path(__file__).resolve().parents[1]
    for name in ("tiny", "qwen2_5_vl_7b"):
        load_config(ModelConfig, root / "conf" / "model" / f"{name}.yaml")


def test_qwen2_5_vl_7b_builds_on_meta_with_expected_param_count():
    from vigos_megatron.models.hf_checkpoint import expected_shapes
    from vigos_megatron.models.hf_configs import QWEN2_5_VL_7B_PARAMS, qwen2_5_vl_7b_config
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder, param_bytes, param_count

    cfg = qwen2_5_vl_7b_config()
    hf_count = sum(math.prod(s) for s in expected_shapes(cfg).values())
    with local_model_parallel():
        builder = QwenVLBuilder.from_hf(cfg, dtype=torch.bfloat16)
        assert builder.provider.mrope_section == [16, 24, 24]
        chunks = builder.build(meta_device=True)
        assert all(p.is_meta for p in chunks[0].parameters())
        n = param_count(chunks)
        nbytes = param_bytes(chunks)
    print(f"Qwen2.5-VL-7B on meta: {n:,} params, {nbytes / 2**30:.2f} GiB in bf16")
    assert n == hf_count == QWEN2_5_VL_7B_PARAMS
    assert nbytes == 2 * n
