"""The Megatron rollout engine (issue 8): sampler, KV-cached generation vs HF, TP/PP parity, buffer release.

In process (TP=1 on one gloo rank): the vocabulary-parallel sampler against Hugging Face's logits
warpers; greedy generation against HF ``generate`` on the ViGOS student context (two image+text
prompts of different lengths, left-padded into one batch); the KV-cached path against full
recomputation; prompts longer than ``prefill_max_tokens`` (column-chunked prefill); seeded sampling
independent of batch composition; buffers released and model state restored; the static decode
step (bucketed rows, every cache column: a CUDA graph's body, run eagerly) against the dynamic one;
on a GPU, CUDA graphs against that eager static step. Multi-process (slow, gloo): TP=2, PP=2 and
TP2xPP2 (static decode) give HF's greedy tokens and the TP=1 sampled tokens
(tests/dist/rollout_parity.py).
"""

from __future__ import annotations

import gc
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from rollout_common import (  # noqa: E402
    MAX_NEW,
    SAMPLING_CASES,
    SAMPLING_STEP,
    early_stop_token,
    hf_greedy,
    sampling_config,
    stop_ids,
    student_prompts,
    truncate_at,
    write_rollout_checkpoint,
)

from vigos_megatron.config.loader import ConfigError, load_config  # noqa: E402
from vigos_megatron.config.sampling import SamplingConfig  # noqa: E402
from vigos_megatron.rollout import sampling as smp  # noqa: E402
from vigos_megatron.rollout.engine import MegatronRolloutEngine, RolloutCompletion, RolloutPrompt  # noqa: E402

# --------------------------------------------------------------------------- sampler (no model)


def _hf_filtered(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """HF's warpers (temperature -> top-k -> top-p) on full-vocabulary logits: removed tokens are -inf."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    x = TemperatureLogitsWarper(cfg.temperature)(None, logits.float())
    if cfg.top_k > 0:
        x = TopKLogitsWarper(cfg.top_k)(None, x)
    if cfg.top_p < 1.0:
        x = TopPLogitsWarper(cfg.top_p)(None, x)
    return x


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(seed=1),  # model card: T 1.1, top-k 20, top-p 0.95
        SamplingConfig(top_k=0, top_p=0.9, temperature=1.0, seed=2),
        SamplingConfig(top_k=5, top_p=1.0, temperature=0.7, seed=3),
        SamplingConfig(top_k=0, top_p=1.0, temperature=1.0, seed=4),
        SamplingConfig(top_k=50, top_p=0.5, temperature=2.0, seed=5),
    ],
    ids=["card", "nucleus", "topk", "plain", "both"],
)
def test_sampler_equals_gumbel_max_over_hf_warped_logits(cfg):
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(16, 384, generator=g) * 3, torch.randn(4, 384, generator=g) * 0.05])
    ids = torch.arange(20) + 1000
    pos = torch.arange(20) % 7
    got = smp.sample_next_tokens(logits, vocab_start=0, sampling=cfg, step=11, sample_ids=ids, positions=pos)
    keys = smp.row_keys(cfg.seed, 11, ids, pos)
    want = (_hf_filtered(logits, cfg).double() + smp.gumbel_noise(keys, torch.arange(384))).argmax(-1)
    assert torch.equal(got, want)


def test_sampler_distribution_matches_filtered_softmax():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    for cfg in (SamplingConfig(top_k=0, top_p=1.0, temperature=1.0), SamplingConfig(top_k=4, top_p=0.8, temperature=1.3)):
        n = 20000
        ids = torch.arange(n)
        got = smp.sample_next_tokens(logits.expand(n, -1), vocab_start=0, sampling=cfg, step=0, sample_ids=ids,
                                     positions=torch.zeros(n, dtype=torch.long))
        freq = torch.bincount(got, minlength=8).double() / n
        want = torch.softmax(_hf_filtered(logits, cfg).double(), -1)[0]
        tv = 0.5 * (freq - want).abs().sum().item()
        print(f"top_k={cfg.top_k} top_p={cfg.top_p}: total variation {tv:.4f} over {n} draws")
        assert tv < 0.015
        assert freq[want == 0].sum() == 0  # filtered tokens never drawn


def test_greedy_ties_go_to_the_lowest_id_and_padding_is_never_chosen():
    logits = torch.zeros(2, 8)
    logits[0, [6, 2, 5]] = 3.0
    logits[1, 7] = 10.0  # a padded-vocabulary column
    got = smp.sample_next_tokens(logits, vocab_start=0, sampling=SamplingConfig(greedy=True), step=0,
                                 sample_ids=torch.arange(2), positions=torch.zeros(2, dtype=torch.long), vocab_size=7)
    assert got.tolist() == [2, 0]


def test_noise_is_keyed_by_every_field_and_uniform():
    for x in (0, 1, 0xFFFFFFFF, 0x12345678, 0x9ABCDEF0):
        for c in (0x7FEB352D, 0x846CA68B):
            assert smp._mul32(torch.tensor([x]), c).item() == (x * c) % 2**32
    ids = torch.arange(4)
    base = smp.uniform_noise(smp.row_keys(1, 2, ids, ids), torch.arange(5000))
    assert base.shape == (4, 5000) and 0 < base.min() and base.max() < 1
    assert abs(base.mean().item() - 0.5) < 0.01 and abs(base.var().item() - 1 / 12) < 0.005
    for keys in (smp.row_keys(9, 2, ids, ids), smp.row_keys(1, 9, ids, ids), smp.row_keys(1, 2, ids + 9, ids),
                 smp.row_keys(1, 2, ids, ids + 9)):
        assert (smp.uniform_noise(keys, torch.arange(5000)) != base).float().mean() > 0.999
    # the noise of (row, id) does not depend on which other ids are asked for (layout independence)
    keys = smp.row_keys(1, 2, ids, ids)
    assert torch.equal(smp.uniform_noise(keys, torch.arange(100, 200)), base[:, 100:200])


def test_sampling_config_validation_names_the_option():
    assert load_config(SamplingConfig, None, ["top_k=0", "top_p=0.9"]).top_k == 0
    for bad, name in (("temperature=0", "temperature"), ("top_p=1.5", "top_p"), ("top_k=-1", "top_k"),
                      ("max_new_tokens=0", "max_new_tokens"), ("max_batch_size=0", "max_batch_size"), ("seed=-1", "seed")):
        with pytest.raises(ConfigError, match=name):
            load_config(SamplingConfig, None, [bad])


# --------------------------------------------------------------------------- engine at TP=1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_rollout_checkpoint(tmp_path_factory.mktemp("rollout") / "hf")


@pytest.fixture(scope="module")
def setup(tiny_dir):
    """Prompts, HF greedy reference, stop ids (one row stops early), and the TP=1 model."""
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder

    prompts = student_prompts(tiny_dir)
    ref = hf_greedy(tiny_dir, prompts)
    stops = stop_ids(tiny_dir) + [early_stop_token(ref)]
    with local_model_parallel():
        builder = QwenVLBuilder.from_hf(tiny_dir)
        chunks = builder.build_from_hf(tiny_dir)
        yield dict(prompts=prompts, ref=ref, stops=stops, builder=builder, chunks=chunks, dir=tiny_dir)


def _engine(s, **kw):
    return MegatronRolloutEngine(s["chunks"], hf_config=s["builder"].hf_config, stop_token_ids=s["stops"],
                                 pad_token_id=s["stops"][1], **kw)


def _ids(outs: list[RolloutCompletion]):
    return [o.token_ids.tolist() for o in outs]


def test_greedy_equals_hf_generate_on_left_padded_image_text_batch(setup):
    outs = _engine(setup).generate(setup["prompts"], SamplingConfig(greedy=True, max_new_tokens=MAX_NEW))
    want = [truncate_at(r, setup["stops"]) for r in setup["ref"]]
    print("prompt lengths", [p.input_ids.numel() for p in setup["prompts"]], "greedy", _ids(outs))
    assert _ids(outs) == want
    # one row ends on the extra stop token (included), the other runs to the length limit
    assert sorted(o.finish_reason for o in outs) == ["length", "stop"]
    for o, w in zip(outs, want):
        assert o.token_ids.dtype == torch.int64 and o.token_ids.device.type == "cpu" and o.length == len(w)
        assert (o.finish_reason == "stop") == (w[-1] in setup["stops"])


def _row_logits(eng, prompts, row, *, unmask_padding=False):
    """Prefill and first decode-step logits ``[2, V]`` of ``prompts[row]`` in a left-padded round (engine internals)."""
    from vigos_megatron.rollout.prompt_batch import build_round, prompt_mrope_positions

    pos = [prompt_mrope_positions(eng.model, p.input_ids, p.image_grid_thw) for p in prompts]
    rnd = build_round([p.input_ids for p in prompts], pos, [p.sample_id for p in prompts], max_new_tokens=2,
                      pad_token_id=eng.pad_token_id, device=torch.device("cpu"))
    if unmask_padding:
        rnd.key_pad.zero_()
    cache = eng._new_cache(rnd)
    with torch.no_grad():
        first = eng._prefill(rnd, *eng._prompt_embeddings(prompts, rnd.input_ids), cache)
        rows = torch.arange(rnd.batch_size)
        second = eng._decode_cached(rnd, rows, first.argmax(-1), rnd.prompt_length, cache)
    return torch.stack([first[row], second[row]])


def test_eval_modules_compute_exactly_what_the_megatron_modules_compute(setup):
    """The cached forward's direct calls (no per-call dispatch) are bit-identical to the modules' forward."""
    from vigos_megatron.rollout.cached_forward import EvalLinear, EvalMLP, EvalQKV

    layer = setup["chunks"][0].language_model.decoder.layers[-1]
    attn = layer.self_attention
    x = torch.randn(5, 3, layer.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        qkv, proj, mlp = EvalQKV(attn), EvalLinear(attn.linear_proj), EvalMLP(layer.mlp)
        assert qkv.plain and proj.plain and mlp.plain
        for got, want in zip(qkv(x), attn.get_query_key_value_tensors(x)):
            assert torch.equal(got, want)
        a = torch.randn(5, 3, attn.linear_proj.input_size_per_partition)
        for got, want in ((proj(a), attn.linear_proj(a)), (mlp(x), layer.mlp(x))):
            assert torch.equal(got[0], want[0]) and got[1] is want[1]


def test_cached_forward_rope_and_attention_match_references():
    """The cached forward's rotary is bit-identical to megatron's unfused rope; its chunked causal
    prefill attention and its decode attention match a float64 softmax over the masked scores."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from vigos_megatron.rollout.cached_forward import apply_rotary, decode_attention, prefill_attention, rotary_cos_sin

    g = torch.Generator().manual_seed(0)
    t, freqs = torch.randn(9, 3, 4, 16, generator=g), torch.randn(9, 3, 1, 16, generator=g) * 5
    assert torch.equal(apply_rotary(t, *rotary_cos_sin(freqs, 0.7, t.dtype)),
                       _apply_rotary_pos_emb_bshd(t, freqs, mscale=0.7))

    b, groups, per_group, d, sq, total = 3, 2, 3, 16, 11, 15  # queries: the last 11 of 15 columns
    q = torch.randn(sq, b, groups * per_group, d, generator=g)
    keys, values = torch.randn(2, b, groups, total, d, generator=g)
    cols = torch.arange(total)
    pad = cols[None, :] < torch.tensor([0, 2, 6])[:, None]  # left padding per row
    future = cols[None, :] > (total - sq + torch.arange(sq))[:, None]
    bias = torch.zeros(b, 1, sq, total).masked_fill(pad[:, None, None] | future, float("-inf"))
    bias = bias.masked_fill(cols == (total - sq + torch.arange(sq))[:, None], 0.0)  # a query sees itself

    def reference(q, bias):  # [sq, b, Nq, D] -> [sq, b, Nq * D], float64
        k, v = (x.double().repeat_interleave(per_group, dim=1) for x in (keys, values))
        scores = q.double().permute(1, 2, 0, 3) @ k.transpose(-1, -2) / d**0.5 + bias.double()
        out = torch.softmax(scores, dim=-1) @ v  # [b, Nq, sq, D]
        return out.permute(2, 0, 1, 3).reshape(q.shape[0], b, -1)

    want = reference(q, bias)
    for chunk in (1, 4, 64):
        got = prefill_attention(q, keys, values, bias, d**-0.5, chunk=chunk)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    last = decode_attention(q[-1].view(b, groups, per_group, d), keys, values, bias[:, :, -1:], d**-0.5)
    torch.testing.assert_close(last.reshape(1, b, -1).double(), want[-1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["panels", "onednn"])
def test_packed_linears_match_the_modules_and_unpack(setup, kernel, monkeypatch):
    """On the CPU the engine's linears run on a packed copy of the weights during generate (the C
    kernel's panels; oneDNN's layout where that kernel is unavailable): the same product up to fp32
    rounding, back to the bit-identical matmul after unpack."""
    from vigos_megatron.rollout import cpu_linear
    from vigos_megatron.rollout.cached_forward import EvalLinear

    if kernel == "onednn":
        monkeypatch.setattr(cpu_linear, "kernel", lambda: None)
    elif cpu_linear.kernel() is None:
        pytest.skip("no C kernel")
    layer = setup["chunks"][0].language_model.decoder.layers[0]
    x = torch.randn(5, 3, layer.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lin = EvalLinear(layer.mlp.linear_fc1)
        want = layer.mlp.linear_fc1(x)[0]
        packed = lin.pack()
        assert packed is not None
        assert isinstance(lin.packed, cpu_linear.Panels) == (kernel == "panels")
        got = lin(x)[0]
        print(f"{kernel} vs matmul: max |diff| {(got - want).abs().max().item():.1e}")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        lin.unpack()
        assert lin.packed is None and torch.equal(lin(x)[0], want)


def test_left_padding_is_invisible_in_the_logits(setup):
    """The short prompt's logits are the same alone and left-padded behind the long one; unmasked padding is not."""
    eng = _engine(setup)
    short, long = sorted(setup["prompts"], key=lambda p: p.input_ids.numel())
    alone = _row_logits(eng, [short], 0)
    padded = _row_logits(eng, [long, short], 1)
    unmasked = _row_logits(eng, [long, short], 1, unmask_padding=True)
    diff, leak = (padded - alone).abs().max().item(), (unmasked - alone).abs().max().item()
    print(f"{long.input_ids.numel() - short.input_ids.numel()} padding columns: max |logit diff| {diff:.2e} "
          f"masked, {leak:.2e} if the padding were attended to")
    assert diff < 1e-4 < 1e-2 < leak


def test_sdpa_layer_spec_generates_the_same_tokens(setup):
    """The GPU default spec without TE ("sdpa") applies the padding mask too: HF's greedy tokens, same samples."""
    from vigos_megatron.models.builder import QwenVLBuilder

    builder = QwenVLBuilder.from_hf(setup["dir"], transformer_impl="sdpa")
    chunks = builder.build_from_hf(setup["dir"])
    eng = MegatronRolloutEngine(chunks, hf_config=builder.hf_config, stop_token_ids=setup["stops"],
                                pad_token_id=setup["stops"][1])
    greedy = eng.generate(setup["prompts"], SamplingConfig(greedy=True, max_new_tokens=MAX_NEW))
    assert _ids(greedy) == [truncate_at(r, setup["stops"]) for r in setup["ref"]]
    cfg = sampling_config("card")
    assert _ids(eng.generate(setup["prompts"], cfg, step=1)) == _ids(_engine(setup).generate(setup["prompts"], cfg, step=1))


def test_text_only_prompt_equals_hf_generate(setup):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup["dir"])
    text = tok.apply_chat_template([{"role": "user", "content": "How many apples are there?"}], tokenize=False,
                                   add_generation_prompt=True) + "<description>"
    p = RolloutPrompt(torch.tensor(tok(text)["input_ids"]), None, None, sample_id=5)
    ref = hf_greedy(setup["dir"], [p], stops=setup["stops"][:2])
    outs = _engine(setup).generate([p], SamplingConfig(greedy=True, max_new_tokens=MAX_NEW))
    assert _ids(outs) == [truncate_at(ref[0], setup["stops"])]


def test_kv_cache_equals_full_recomputation(setup):
    cached, full = _engine(setup), _engine(setup, use_kv_cache=False)
    for cfg in (SamplingConfig(greedy=True, max_new_tokens=MAX_NEW), sampling_config("card")):
        a = cached.generate(setup["prompts"], cfg, step=1)
        b = full.generate(setup["prompts"], cfg, step=1)
        assert _ids(a) == _ids(b) and [o.finish_reason for o in a] == [o.finish_reason for o in b]
    assert cached.last_stats.kv_cache_bytes > 0 and full.last_stats.kv_cache_bytes == 0


def _five_rows_ending_apart(setup):
    """Five prompts (the two student prompts, distinct sample ids) and stop ids under which the
    seeded rows end at different steps (so the live rows go 5 -> 4 -> 3 ...)."""
    many = [RolloutPrompt(**{**vars(setup["prompts"][i % 2]), "sample_id": i}) for i in range(5)]
    first = _ids(_engine(setup).generate(many, sampling_config("card"), step=3))
    return many, setup["stops"] + [row[min(k, len(row) - 1)] for row, k in zip(first, (4, 11, 8, 14, 2))]


def test_static_decode_gives_the_dynamic_tokens_through_the_buckets(setup):
    """decode_mode "static" (a CUDA graph's body run eagerly: rows in buckets 1, 2, 4, 5, every cache
    column attended, the column index a tensor) gives the dynamic path's tokens and finish reasons,
    while finished rows leave padding slots in a bucket; its buffers are released with the round."""
    many, stops = _five_rows_ending_apart(setup)
    kw = dict(hf_config=setup["builder"].hf_config, stop_token_ids=stops, pad_token_id=setup["stops"][1])
    dyn = MegatronRolloutEngine(setup["chunks"], **kw)
    static = MegatronRolloutEngine(setup["chunks"], decode_mode="static", **kw)
    padded = 0
    for cfg in (SamplingConfig(greedy=True, max_new_tokens=MAX_NEW), sampling_config("card")):
        a, b = dyn.generate(many, cfg, step=3), static.generate(many, cfg, step=3)
        print(f"{'greedy' if cfg.greedy else 'sampled'}: lengths {[o.length for o in b]}, "
              f"{static.last_stats.padding_rows} padding rows")
        assert _ids(a) == _ids(b) and [o.finish_reason for o in a] == [o.finish_reason for o in b]
        assert len({o.length for o in b}) > (1 if cfg.greedy else 2)
        padded += static.last_stats.padding_rows
        assert all(r() is None for r in static.last_buffers)
    assert padded > 0 and dyn.last_stats.padding_rows == 0 and static.last_stats.graph_captures == 0


def test_decode_mode_is_checked_and_buckets_cover_every_batch(setup):
    from vigos_megatron.rollout.static_decode import batch_buckets

    assert [batch_buckets(b) for b in (1, 2, 5, 8)] == [[1], [1, 2], [1, 2, 4, 5], [1, 2, 4, 8]]
    bad = [dict(decode_mode="eager"), dict(decode_mode="static", use_kv_cache=False)]
    if next(setup["chunks"][0].parameters()).device.type != "cuda":
        bad.append(dict(decode_mode="graphs"))
    for kw in bad:
        with pytest.raises(ValueError, match="decode_mode: expected one of dynamic, static, graphs"):
            _engine(setup, **kw)


def test_prompts_longer_than_prefill_max_tokens_are_prefilled_in_column_chunks(setup):
    """Every prompt exceeds 64 tokens: each row is prefilled alone in chunks of 64 columns that attend
    to the rotated keys cached by the chunks before them; same tokens as HF and as one-block prefill."""
    eng = _engine(setup, prefill_max_tokens=64)
    lengths = [p.input_ids.numel() for p in setup["prompts"]]
    assert min(lengths) > 64
    blocks = eng._prefill_chunks(2, max(lengths))
    assert blocks[:2] == [((0, 1), (0, 64)), ((0, 1), (64, 128))] and blocks[-1] == ((1, 2), (384, max(lengths)))
    outs = eng.generate(setup["prompts"], SamplingConfig(greedy=True, max_new_tokens=MAX_NEW))
    assert _ids(outs) == [truncate_at(r, setup["stops"]) for r in setup["ref"]]
    cfg = sampling_config("card")
    whole = _engine(setup, prefill_max_tokens=4096)
    assert _ids(eng.generate(setup["prompts"], cfg, step=1)) == _ids(whole.generate(setup["prompts"], cfg, step=1))


def test_seeded_sampling_is_reproducible_and_independent_of_batching(setup):
    eng = _engine(setup)
    cfg = sampling_config("card")
    a = _ids(eng.generate(setup["prompts"], cfg, step=SAMPLING_STEP))
    assert a == _ids(eng.generate(setup["prompts"], cfg, step=SAMPLING_STEP))
    # one prompt per round, and each prompt alone: same tokens (the noise is keyed by sample id)
    assert a == _ids(eng.generate(setup["prompts"], sampling_config("card", max_batch_size=1), step=SAMPLING_STEP))
    assert [a[1]] == _ids(eng.generate(setup["prompts"][1:], cfg, step=SAMPLING_STEP))
    assert eng.last_stats.rounds == 1
    # another seed, step or sample id gives other tokens
    assert a != _ids(eng.generate(setup["prompts"], sampling_config("card", seed=8), step=SAMPLING_STEP))
    assert a != _ids(eng.generate(setup["prompts"], cfg, step=SAMPLING_STEP + 1))
    shifted = student_prompts(setup["dir"], first_sample_id=10)
    assert a != _ids(eng.generate(shifted, cfg, step=SAMPLING_STEP))
    # the same prompt twice with different sample ids: two different completions
    twice = [setup["prompts"][0], RolloutPrompt(**{**vars(setup["prompts"][0]), "sample_id": 99})]
    x, y = _ids(eng.generate(twice, cfg, step=SAMPLING_STEP))
    assert x == a[0] and x != y
    # three prompts in rounds of two (sorted by length inside the call): results in the caller's order
    three = [setup["prompts"][0], twice[1], setup["prompts"][1]]
    assert _ids(eng.generate(three, sampling_config("card", max_batch_size=2), step=SAMPLING_STEP)) == [a[0], y, a[1]]
    assert eng.last_stats.rounds == 2


def test_single_new_token_is_the_prefill_choice(setup):
    outs = _engine(setup).generate(setup["prompts"], SamplingConfig(greedy=True, max_new_tokens=1))
    assert _ids(outs) == [r[:1] for r in setup["ref"]]
    assert all(o.finish_reason == ("stop" if o.token_ids[0] in setup["stops"] else "length") for o in outs)


def test_generation_releases_buffers_and_restores_model_state(setup):
    from megatron.core import parallel_state

    model = setup["chunks"][0]
    model.train()
    model.language_model.decoder.layers[0].eval()  # a mixed train/eval state must come back as it was
    flags = {n: m.training for n, m in model.named_modules()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    sentinel = torch.zeros(1)
    model.language_model.decoder.input_tensor = sentinel
    gbuf = dict(parallel_state.get_global_memory_buffer().buffer)

    eng = _engine(setup, prefill_max_tokens=500)  # prefill in row groups too
    outs = eng.generate(setup["prompts"], sampling_config("card"))
    assert all(o.length > 0 for o in outs)
    refs = eng.last_buffers
    assert len(refs) >= 6 + 2  # round tensors + the KV cache (K and V of every layer) and its mask
    dead = [r() is None for r in refs]
    print(f"{len(refs)} generation buffers tracked, {sum(dead)} released on return")
    assert all(dead)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert model.language_model.decoder.input_tensor is sentinel
    buf = parallel_state.get_global_memory_buffer().buffer
    assert buf.keys() == gbuf.keys() and all(buf[k] is gbuf[k] for k in buf)
    assert all(p.grad is None for p in model.parameters())
    model.language_model.decoder.input_tensor = None
    model.eval()


def test_bad_prompts_and_settings_raise_clear_errors(setup):
    eng = _engine(setup)
    p = setup["prompts"][0]
    cases = [
        (RolloutPrompt(p.input_ids, None, None, 0), r"prompts\[0\]: \d+ <\|image_pad\|> tokens but the image grid gives 0"),
        (RolloutPrompt(p.input_ids.to(torch.int32), p.pixel_values, p.image_grid_thw, 0), r"prompts\[0\]\.input_ids"),
        (RolloutPrompt(p.input_ids, p.pixel_values[:-4], p.image_grid_thw, 0), r"prompts\[0\]: pixel_values has"),
        (RolloutPrompt(p.input_ids, p.pixel_values, None, 0), "both be given"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            eng.generate([bad], SamplingConfig(greedy=True, max_new_tokens=2))
    with pytest.raises(ConfigError, match="top_p"):
        eng.generate([p], SamplingConfig(top_p=0.0))
    with pytest.raises(ValueError, match="stop_token_ids"):
        MegatronRolloutEngine(setup["chunks"], hf_config=setup["builder"].hf_config, stop_token_ids=[], pad_token_id=0)
    assert eng.generate([], SamplingConfig()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_returns_to_its_pre_generation_level(tiny_dir):
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder

    prompts = student_prompts(tiny_dir)
    stops = stop_ids(tiny_dir)
    with local_model_parallel():
        builder = QwenVLBuilder.from_hf(tiny_dir, dtype=torch.bfloat16)
        chunks = builder.build_from_hf(tiny_dir)
        assert next(chunks[0].parameters()).is_cuda
        eng = MegatronRolloutEngine(chunks, hf_config=builder.hf_config, stop_token_ids=stops, pad_token_id=stops[1])
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        outs = eng.generate(prompts, SamplingConfig(max_new_tokens=64, top_k=0, top_p=1.0))
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
        print(f"allocated before {before} after {after}; KV cache was {eng.last_stats.kv_cache_bytes} bytes")
        assert eng.last_stats.kv_cache_bytes > 0 and sum(o.length for o in outs) > 0
        assert after == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_replay_the_eager_static_step(tiny_dir, setup):
    """bf16 on CUDA: the decode steps replayed from CUDA graphs give exactly the tokens of the same
    static step run eagerly (same buckets, so the same GEMM shapes), one capture per bucket used."""
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.startup import local_model_parallel

    many, stops = _five_rows_ending_apart(setup)
    with local_model_parallel():
        builder = QwenVLBuilder.from_hf(tiny_dir, dtype=torch.bfloat16)
        chunks = builder.build_from_hf(tiny_dir)
        assert next(chunks[0].parameters()).is_cuda
        kw = dict(hf_config=builder.hf_config, stop_token_ids=stops, pad_token_id=stops[1])
        graphs = MegatronRolloutEngine(chunks, **kw)
        eager = MegatronRolloutEngine(chunks, decode_mode="static", **kw)
        assert graphs.decode_mode == "graphs"
        for cfg in (SamplingConfig(greedy=True, max_new_tokens=MAX_NEW), sampling_config("card")):
            a, b = graphs.generate(many, cfg, step=3), eager.generate(many, cfg, step=3)
            st = graphs.last_stats
            print(f"lengths {[o.length for o in a]}: {st.graph_captures} captures in {st.capture_seconds:.3f} s, "
                  f"{st.padding_rows} padding rows")
            assert _ids(a) == _ids(b) and [o.finish_reason for o in a] == [o.finish_reason for o in b]
            assert 1 <= st.graph_captures <= 4 and eager.last_stats.graph_captures == 0
            assert all(r() is None for r in graphs.last_buffers)


# --------------------------------------------------------------------------- TP / PP (gloo processes)


def _results(out: str) -> dict:
    return dict(re.findall(r"RESULT (\w+)=(\S+)", out))


@pytest.fixture(scope="module")
def tp1_sampled(setup):
    eng = _engine(setup)
    return {name: [[o.token_ids.tolist(), o.finish_reason] for o in eng.generate(setup["prompts"], sampling_config(name),
                                                                                   step=SAMPLING_STEP)]
            for name in SAMPLING_CASES}


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_model_parallel_generation_matches_hf_and_tp1(torchrun, setup, tp1_sampled, tp, pp):
    extra = [] if pp == 1 else ["--prefill-max-tokens", 200]  # prefill in row groups through the pipeline
    if tp * pp == 4:  # the static decode step (a CUDA graph's body, run eagerly) through TP and PP
        extra += ["--decode-mode", "static"]
    r = _results(torchrun("rollout_parity.py", tp * pp, "--tp", tp, "--pp", pp, "--hf", setup["dir"], *extra))
    print(f"TP={tp} PP={pp}: greedy==HF {r['greedy_matches_hf']}, finish {r['finish_reasons']}, "
          f"sampler mismatches {r['sampler_mismatches']}")
    assert r["greedy_matches_hf"] == "1"
    assert sorted(r["finish_reasons"].split(",")) == ["length", "stop"]
    assert r["ranks_identical"] == "1"
    assert r["sampler_mismatches"] == "0"
    for name in SAMPLING_CASES:
        assert json.loads(r[f"sampled_{name}"]) == tp1_sampled[name], name
