"""The "sdpa" layer spec (vigos_megatron/models/specs.py): exact against megatron-core's local spec.

* core attention alone vs megatron-core's ``DotProductAttention`` (fp32, GQA heads): causal
  without a mask tensor, causal+padding masks (right and left padding), a decode step, a chunk
  of queries over a longer key cache (bottom-right causality), no mask, an explicit softmax
  scale; outputs and the gradients of query, key and value within 1e-5; bf16; dropout;
* the spec's self-attention in bf16 hands the core attention the rope computed in fp32;
* the tiny Qwen2.5-VL built with each spec from one checkpoint: logits within 1e-5 and every
  parameter gradient within 1e-5 of its scale, same parameter names and checkpoint keys;
  an explicit padding mask through the whole model (also vs. the unpadded rows run alone);
* selection: "auto" -> "local" on the CPU, "sdpa" where CUDA is in use without TE;
* TP=2 (slow, gloo): tests/dist/sdpa_parity.py (vs the local spec and vs Hugging Face);
* the GPU settings of "sdpa" (megatron-core's torch.compile'd SwiGLU) run on the CPU (slow).
"""

import functools
import re

import pytest
import torch

TOL = 1e-5


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def mp():
    from vigos_megatron.startup import local_model_parallel

    with local_model_parallel() as ps:
        yield ps


def _config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


def _pair(config, mask_type=None, softmax_scale=None):
    """(megatron-core local DotProductAttention, SDPADotProductAttention) on the same config."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from vigos_megatron.models.specs import SDPADotProductAttention

    mask_type = AttnMaskType.causal if mask_type is None else mask_type
    kw = dict(config=config, layer_number=1, attn_mask_type=mask_type, attention_type="self",
              softmax_scale=softmax_scale)
    return DotProductAttention(**kw), SDPADotProductAttention(**kw)


def _qkv(sq, sk, b=2, np_=4, ng=2, hn=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return mk(sq, b, np_, hn), mk(sk, b, ng, hn), mk(sk, b, ng, hn)


def _run(module, q, k, v, mask, grad_out, **kw):
    """Output and (dq, dk, dv) of ``module`` for upstream gradient ``grad_out``."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask, **kw)
    out.backward(grad_out)
    return out.detach(), (q.grad, k.grad, v.grad)


def _causal_padding_mask(lengths, s, *, left: bool):
    """megatron bool mask [b, 1, s, s], True = masked out: causal plus padded keys."""
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    pos = torch.arange(s)
    pads = []
    for n in lengths:
        pads.append(pos < s - n if left else pos >= n)
    pad_key = torch.stack(pads)[:, None, None, :]  # [b, 1, 1, s]
    return causal[None, None] | pad_key


def _assert_close(a, b, what, tol=TOL):
    d = (a - b).abs().max().item()
    assert d <= tol, f"{what}: max abs diff {d:.3e} > {tol:.0e}"
    return d


# --------------------------------------------------------------------------- core attention


@pytest.mark.parametrize("case", ["causal_no_mask", "right_padding", "left_padding", "decode_step",
                                  "chunk_over_cache", "padding_type_no_mask", "softmax_scale"])
def test_core_attention_matches_local(mp, case):
    from megatron.core.transformer.enums import AttnMaskType

    from vigos_megatron.models.specs import bottom_right_causal_visible

    s = 12
    config = _config()
    mask_type, scale, mask, ref_mask = AttnMaskType.causal, None, None, None
    sq, sk = s, s
    rows = slice(None)  # query rows whose output is meaningful
    if case == "right_padding":
        mask = _causal_padding_mask([12, 7], s, left=False)
    elif case == "left_padding":
        mask = _causal_padding_mask([12, 7], s, left=True)  # row 1's first 5 queries see no key
    elif case == "decode_step":
        sq = 1
    elif case == "chunk_over_cache":
        sq = 5
        ref_mask = ~bottom_right_causal_visible(sq, sk, "cpu")[None, None]  # local asserts sq == sk without it
    elif case == "padding_type_no_mask":
        mask_type = AttnMaskType.padding
    elif case == "softmax_scale":
        scale = 0.37
    local, sdpa = _pair(config, mask_type, scale)
    q, k, v = _qkv(sq, sk)
    grad_out = torch.randn(sq, 2, 4 * 16, generator=torch.Generator().manual_seed(1))
    if case == "left_padding":
        has_key = (~mask).any(-1)[:, 0, :]  # [b, sq]
        grad_out = grad_out * has_key.T[:, :, None]  # rows without a visible key carry no gradient
        rows = has_key.T  # [sq, b]
    ref_out, ref_grads = _run(local, q, k, v, mask if ref_mask is None else ref_mask, grad_out)
    out, grads = _run(sdpa, q, k, v, mask, grad_out)
    assert out.shape == ref_out.shape == (sq, 2, 64) and out.is_contiguous()
    assert torch.isfinite(out).all()
    d = _assert_close(out[rows], ref_out[rows], f"{case}: output")
    for name, g, rg in zip("qkv", grads, ref_grads):
        _assert_close(g, rg, f"{case}: d{name}")
    print(f"{case}: max abs output diff {d:.2e}")


def test_core_attention_native_gqa_and_repeat_paths_agree(mp):
    """No mask -> enable_gqa (no K/V copy); a mask -> repeated K/V heads; same numbers."""
    from vigos_megatron.models.specs import sdpa_attention, use_native_gqa

    q, k, v = _qkv(10, 10)
    visible = torch.ones(10, 10, dtype=torch.bool).tril()
    assert use_native_gqa(None, 16) and not use_native_gqa(visible, 16) and not use_native_gqa(None, 512)
    a = sdpa_attention(q, k, v, attn_mask=None, is_causal=True, scale=0.25, dropout_p=0.0)
    b = sdpa_attention(q, k, v, attn_mask=visible, is_causal=False, scale=0.25, dropout_p=0.0)
    _assert_close(a, b, "native GQA vs repeated heads")


def test_core_attention_bf16_and_dropout(mp):
    q, k, v = _qkv(12, 12)
    local32, sdpa32 = _pair(_config())
    _, sdpa16 = _pair(_config(bf16=True, params_dtype=torch.bfloat16))
    ref = local32(q, k, v, None)
    out16 = sdpa16(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert out16.dtype == torch.bfloat16
    _assert_close(out16.float(), ref, "bf16 vs fp32 local", tol=3e-2)

    from megatron.core import tensor_parallel

    _, drop = _pair(_config(attention_dropout=0.5))
    drop.eval()
    _assert_close(drop(q, k, v, None), ref, "dropout module in eval mode")
    drop.train()
    outs = []
    for _ in range(2):
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        outs.append(drop(q, k, v, None))
    assert torch.equal(outs[0], outs[1]), "dropout must follow megatron's model-parallel RNG stream"
    assert (outs[0] - ref).abs().max() > 1e-2, "attention_dropout=0.5 in training changed nothing"


def test_sdpa_self_attention_rotates_query_and_key_in_fp32(mp):
    """The sdpa spec's self-attention (bf16): the core attention receives the rope of the bf16
    projections computed in fp32 (megatron's unfused rope rounds cos/sin and every product)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.spec_utils import build_module

    from vigos_megatron.models.specs import Fp32RopeSelfAttention, get_gpt_layer_sdpa_spec

    cfg = _config(bf16=True, params_dtype=torch.bfloat16)
    attn = build_module(get_gpt_layer_sdpa_spec().submodules.self_attention, config=cfg, layer_number=1)
    assert isinstance(attn, Fp32RopeSelfAttention)
    s, b = 40, 2
    g = torch.Generator().manual_seed(3)
    x = torch.randn(s, b, 64, generator=g).bfloat16()
    freqs = (torch.arange(s, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(8) / 8))
    freqs = torch.cat([freqs, freqs], -1)[:, None, None, :] * 7.0  # [s, 1, 1, hn], positions up to 273
    seen = {}
    attn.core_attention.register_forward_pre_hook(lambda m, args: seen.update(q=args[0], k=args[1], v=args[2]))
    with torch.no_grad():
        out, _ = attn(x, None, rotary_pos_emb=(freqs, freqs))
        q16, k16, v16 = SelfAttention.get_query_key_value_tensors(attn, x, None)
    assert out.dtype == torch.bfloat16 and seen["v"].dtype == torch.bfloat16
    assert seen["q"].dtype == seen["k"].dtype == torch.float32
    assert torch.equal(seen["v"], v16)
    for name, raw in (("q", q16), ("k", k16)):
        exact = _apply_rotary_pos_emb_bshd(raw.double(), freqs.double())
        bf16_rope = _apply_rotary_pos_emb_bshd(raw, freqs)  # megatron's, in the activations' dtype
        err = float((seen[name].double() - exact).abs().max() / exact.abs().max())
        err16 = float((bf16_rope.double() - exact).abs().max() / exact.abs().max())
        assert err < 1e-6, (name, err)
        assert err16 > 1e-3, (name, err16)  # what the fp32 rotation avoids


def test_core_attention_errors(mp):
    from megatron.core.packed_seq_params import PackedSeqParams

    from vigos_megatron.models.specs import SDPASpecError

    _, sdpa = _pair(_config())
    q, k, v = _qkv(6, 6)
    with pytest.raises(SDPASpecError, match="bool tensor"):
        sdpa(q, k, v, torch.zeros(1, 1, 6, 6))
    with pytest.raises(SDPASpecError, match=re.escape("expected shape [b|1, 1|np, 6|1, 6]")):
        sdpa(q, k, v, torch.zeros(1, 6, 6, dtype=torch.bool))
    with pytest.raises(SDPASpecError, match="packed sequences"):
        sdpa(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(SDPASpecError, match="window_size"):
        _pair(_config(window_size=(4, 0)))


# --------------------------------------------------------------------------- tiny Qwen2.5-VL


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from vigos_megatron.testing.tiny_qwen import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("sdpa") / "hf")


@pytest.fixture(scope="module")
def models(tiny_dir, mp):
    """{impl: model} for "local" and "sdpa", same HF checkpoint, TP=1, fp32."""
    from vigos_megatron.models.builder import QwenVLBuilder

    out = {}
    for impl in ("local", "sdpa"):
        builder = QwenVLBuilder.from_hf(tiny_dir, transformer_impl=impl)
        assert builder.transformer_impl == impl
        out[impl] = builder.build_from_hf(tiny_dir)[0]
    return out


def _forward_backward(model, batch, attention_mask=None, seed=0):
    """Logits and {name: grad} for the loss sum(logits * w), w fixed random / numel."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], pixel_values=batch.get("pixel_values"),
                   image_grid_thw=batch.get("image_grid_thw"), attention_mask=attention_mask)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed)) / logits.numel()
    (logits * w).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tiny_qwen_sdpa_matches_local_logits_and_gradients(tiny_dir, models):
    from vigos_megatron.models.specs import SDPADotProductAttention
    from vigos_megatron.testing.tiny_qwen import image_text_batch

    local, sdpa = models["local"], models["sdpa"]
    cores = [layer.self_attention.core_attention for layer in sdpa.language_model.decoder.layers]
    assert len(cores) == 2 and all(isinstance(c, SDPADotProductAttention) for c in cores)
    assert type(local.language_model.decoder.layers[0].self_attention.core_attention).__name__ == "DotProductAttention"
    assert [n for n, _ in local.named_parameters()] == [n for n, _ in sdpa.named_parameters()]
    assert local.sharded_state_dict().keys() == sdpa.sharded_state_dict().keys()

    batch = image_text_batch(tiny_dir)
    ref_logits, ref_grads = _forward_backward(local, batch)
    logits, grads = _forward_backward(sdpa, batch)
    d = _assert_close(logits, ref_logits, "logits sdpa vs local")
    assert ref_grads.keys() == grads.keys() and len(grads) == len(list(sdpa.parameters()))
    worst = 0.0
    for n, g in grads.items():
        scale = ref_grads[n].abs().max().item()
        assert scale > 0, f"{n}: zero gradient"
        rel = (g - ref_grads[n]).abs().max().item() / scale
        assert rel <= TOL, f"{n}: gradient differs by {rel:.2e} of its scale"
        worst = max(worst, rel)
    print(f"TP=1: logits max abs diff {d:.2e}; gradients: worst max-abs diff / scale {worst:.2e} over {len(grads)}")


def test_tiny_qwen_padding_mask_path(models):
    """Right padding (causal+padding mask through the whole model) equals the rows run alone
    unpadded; with left padding (queries without any visible key) the logits stay finite and
    the real positions match the local spec."""
    from vigos_megatron.testing.tiny_qwen import special_token_ids

    local, sdpa = models["local"], models["sdpa"]
    s, lengths = 16, [16, 11]
    vision = {v for k, v in special_token_ids().items() if "vision" in k or "image" in k or "video" in k}
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (2, s), generator=g)
    assert not any(int(t) in vision for t in ids.flatten())
    pad_id = special_token_ids()["<|endoftext|>"]
    for left in (False, True):
        rows = ids.clone()
        real = torch.zeros(2, s, dtype=torch.bool)
        for r, n in enumerate(lengths):
            sl = slice(s - n, s) if left else slice(0, n)
            real[r, sl] = True
        rows[~real] = pad_id
        mask = _causal_padding_mask(lengths, s, left=left)
        ref, ref_grads = _forward_backward(local, {"input_ids": rows}, mask)
        out, grads = _forward_backward(sdpa, {"input_ids": rows}, mask)
        assert torch.isfinite(out).all()
        _assert_close(out[real], ref[real], f"{'left' if left else 'right'} padding: real positions sdpa vs local")
        # the padded row equals that row alone, unpadded and without a mask tensor (is_causal);
        # for left padding this holds only if the mask hides the pads (rotary scores depend on
        # relative positions only, so the shifted positions do not matter)
        n = lengths[1]
        alone, _ = _forward_backward(sdpa, {"input_ids": rows[1:][real[1:]].view(1, n)})
        _assert_close(out[1][real[1]], alone[0], f"{'left' if left else 'right'}-padded row vs the row alone")
        if not left:
            # gradients (the loss weights padded positions too; they see real keys only)
            for name, gr in grads.items():
                rel = (gr - ref_grads[name]).abs().max().item() / ref_grads[name].abs().max().item()
                assert rel <= TOL, f"right padding, {name}: gradient differs by {rel:.2e} of its scale"


# --------------------------------------------------------------------------- selection


def test_transformer_impl_selection(monkeypatch, tiny_dir):
    from vigos_megatron import runtime
    from vigos_megatron.config.loader import ConfigError, load_config
    from vigos_megatron.config.model import ModelConfig
    from vigos_megatron.models import builder as model_builder
    from vigos_megatron.models.builder import ModelBuildError, QwenVLBuilder, resolve_transformer_impl
    from vigos_megatron.models.specs import sdpa_block_spec

    if not runtime.use_cuda():
        assert resolve_transformer_impl("auto") == "local"  # the CPU suite keeps the local spec
    assert resolve_transformer_impl("sdpa") == "sdpa" and resolve_transformer_impl("local") == "local"
    with pytest.raises(ModelBuildError, match="unknown value 'flash'.*sdpa"):
        resolve_transformer_impl("flash")
    monkeypatch.setattr(model_builder, "transformer_engine_available", lambda: False)
    monkeypatch.setattr(runtime, "use_cuda", lambda: True)
    assert resolve_transformer_impl("auto") == "sdpa"
    monkeypatch.setattr(runtime, "use_cuda", lambda: False)
    assert resolve_transformer_impl("auto") == "local"
    monkeypatch.setattr(model_builder, "transformer_engine_available", lambda: True)
    assert resolve_transformer_impl("auto") == "transformer_engine"
    monkeypatch.undo()

    p = QwenVLBuilder.from_hf(tiny_dir, transformer_impl="sdpa").provider
    assert p.transformer_layer_spec is sdpa_block_spec
    assert p.bias_activation_fusion == runtime.use_cuda()  # megatron's fused SwiGLU on GPUs only
    assert load_config(ModelConfig, None, ["transformer_impl=sdpa"]).transformer_impl == "sdpa"
    with pytest.raises(ConfigError, match="transformer_impl"):
        load_config(ModelConfig, None, ["transformer_impl=flash"])


def test_layer_spec_is_the_local_spec_but_attention():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from vigos_megatron.models.specs import Fp32RopeSelfAttention, SDPADotProductAttention, get_gpt_layer_sdpa_spec

    local = get_gpt_layer_local_spec(normalization="RMSNorm")
    sdpa = get_gpt_layer_sdpa_spec(normalization="RMSNorm")
    assert sdpa.submodules.self_attention.submodules.core_attention is SDPADotProductAttention
    assert sdpa.submodules.self_attention.module is Fp32RopeSelfAttention
    def same(a, b):  # functools.partial compares by identity
        if isinstance(a, functools.partial) and isinstance(b, functools.partial):
            return a.func == b.func and a.args == b.args and a.keywords == b.keywords
        return a == b

    for f in ("input_layernorm", "pre_mlp_layernorm", "mlp", "self_attn_bda", "mlp_bda"):
        assert same(getattr(sdpa.submodules, f), getattr(local.submodules, f)), f
    for f in ("linear_qkv", "linear_proj", "q_layernorm", "k_layernorm"):
        assert same(getattr(sdpa.submodules.self_attention.submodules, f),
                    getattr(local.submodules.self_attention.submodules, f)), f
    assert sdpa.submodules.self_attention.params == local.submodules.self_attention.params


# --------------------------------------------------------------------------- TP=2


@pytest.mark.slow
def test_tp2_sdpa_matches_local_and_hf(torchrun, tiny_dir):
    out = torchrun("sdpa_parity.py", 2, "--tp", 2, "--hf", tiny_dir)
    r = dict(re.findall(r"RESULT (\w+)=(\S+)", out))
    print(f"TP=2: logits sdpa vs local {r['logits_sdpa_vs_local']}, vs HF {r['logits_sdpa_vs_hf']}; "
          f"gradients {r['grad_rel_diff']} of scale over {r['grad_tensors']} tensors per rank; "
          f"left padding {r['padding_sdpa_vs_local']}")
    assert (r["core_attention_local"], r["core_attention_sdpa"]) == ("DotProductAttention", "SDPADotProductAttention")
    assert float(r["logits_sdpa_vs_local"]) <= TOL
    assert float(r["logits_sdpa_vs_hf"]) <= TOL
    assert float(r["grad_rel_diff"]) <= TOL and int(r["grad_tensors"]) >= 40
    assert float(r["padding_sdpa_vs_local"]) <= TOL and r["padding_finite"] == "1"


@pytest.mark.slow
def test_gpu_settings_fused_swiglu_match_local(monkeypatch, tiny_dir, models):
    """The settings "sdpa" takes on a GPU (megatron-core's torch.compile'd SwiGLU) run here on
    the CPU: logits and gradients still equal the local spec's."""
    from vigos_megatron import runtime
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.testing.tiny_qwen import image_text_batch

    with monkeypatch.context() as m:
        m.setattr(runtime, "use_cuda", lambda: True)
        builder = QwenVLBuilder.from_hf(tiny_dir, transformer_impl="sdpa")
    assert builder.provider.bias_activation_fusion
    fused = builder.build_from_hf(tiny_dir)[0]
    assert all(layer.mlp.config.bias_activation_fusion for layer in fused.language_model.decoder.layers)
    batch = image_text_batch(tiny_dir)
    ref_logits, ref_grads = _forward_backward(models["local"], batch)
    logits, grads = _forward_backward(fused, batch)
    _assert_close(logits, ref_logits, "logits sdpa+fused SwiGLU vs local")
    for n, g in grads.items():
        rel = (g - ref_grads[n]).abs().max().item() / ref_grads[n].abs().max().item()
        assert rel <= TOL, f"{n}: gradient differs by {rel:.2e} of its scale"
