"""The rollout engine on Qwen3-VL: deepstack in the prefill, interleaved mrope in decode.

TP=1 in process: greedy equals HF ``generate`` token for token (two left-padded student prompts of
different image sizes; attention sharpened so that a wrong position or a missing deepstack feature
changes the tokens) through the KV cache with the local and sdpa specs (local: also the static
decode step) and through full recomputation (sdpa); the local spec's recomputation path is
refused (Bridge's Qwen3-VL attention ignores the padding mask there). Multi-process (slow): TP=2
and PP=2 give HF's greedy tokens and the TP=1 sampled tokens (tests/dist/rollout_parity.py).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

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

from vigos_megatron.config.sampling import SamplingConfig  # noqa: E402
from vigos_megatron.rollout.engine import MegatronRolloutEngine  # noqa: E402


@pytest.fixture(scope="module")
def setup3(tmp_path_factory):
    from vigos_megatron.models.builder import QwenVLBuilder
    from vigos_megatron.startup import local_model_parallel

    d = write_rollout_checkpoint(tmp_path_factory.mktemp("rollout3") / "hf", family="qwen3_vl")
    prompts = student_prompts(d)
    ref = hf_greedy(d, prompts)
    stops = stop_ids(d) + [early_stop_token(ref)]
    with local_model_parallel():
        chunks = {}
        for impl in ("local", "sdpa"):
            builder = QwenVLBuilder.from_hf(d, transformer_impl=impl)
            chunks[impl] = (builder, builder.build_from_hf(d))
        yield dict(prompts=prompts, ref=ref, stops=stops, chunks=chunks, dir=d)


def _engine(s, impl: str, **kw):
    builder, chunks = s["chunks"][impl]
    return MegatronRolloutEngine(chunks, hf_config=builder.hf_config, stop_token_ids=s["stops"],
                                 pad_token_id=s["stops"][1], **kw)


@pytest.mark.parametrize("impl,kv,mode", [("local", True, "dynamic"), ("local", True, "static"),
                                          ("sdpa", True, "dynamic"), ("sdpa", False, "dynamic")],
                         ids=["local-cache", "local-static", "sdpa-cache", "sdpa-recompute"])
def test_greedy_equals_hf_generate(setup3, impl, kv, mode):
    grids = [p.image_grid_thw.tolist() for p in setup3["prompts"]]
    assert grids[0] != grids[1]
    eng = _engine(setup3, impl, use_kv_cache=kv, decode_mode=mode)
    outs = eng.generate(setup3["prompts"], SamplingConfig(greedy=True, max_new_tokens=MAX_NEW))
    got = [o.token_ids.tolist() for o in outs]
    assert got == [truncate_at(r, setup3["stops"]) for r in setup3["ref"]]
    assert sorted(o.finish_reason for o in outs) == ["length", "stop"]


def test_local_spec_recomputation_is_refused(setup3):
    with pytest.raises(ValueError, match="use_kv_cache=False needs a core attention that applies the explicit padding mask"):
        _engine(setup3, "local", use_kv_cache=False)


@pytest.fixture(scope="module")
def tp1_sampled3(setup3):
    eng = _engine(setup3, "local")
    return {name: [[o.token_ids.tolist(), o.finish_reason] for o in eng.generate(setup3["prompts"], sampling_config(name),
                                                                                   step=SAMPLING_STEP)]
            for name in SAMPLING_CASES}


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_model_parallel_generation_matches_hf_and_tp1(torchrun, setup3, tp1_sampled3, tp, pp):
    extra = [] if pp == 1 else ["--prefill-max-tokens", 200]
    out = torchrun("rollout_parity.py", tp * pp, "--tp", tp, "--pp", pp, "--hf", setup3["dir"], *extra)
    r = dict(re.findall(r"RESULT (\w+)=(\S+)", out))
    assert r["greedy_matches_hf"] == "1" and r["ranks_identical"] == "1" and r["sampler_mismatches"] == "0"
    for name in SAMPLING_CASES:
        assert json.loads(r[f"sampled_{name}"]) == tp1_sampled3[name], name
