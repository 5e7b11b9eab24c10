"""The rollouts after an optimizer step read the post-step weights, at DP=2 with the distributed optimizer.

* fast: ``optimizer.overlap_param_gather`` is validated (needs the distributed optimizer and
  DP > 1, named in the error) and reaches megatron's DDP and optimizer configs only with the
  distributed optimizer;
* slow (``tests/dist/dp_weights_worker.py``, 2 gloo ranks, TP=1 PP=1, the loop's own set-up):
  after each real ``train_step``, the full post-step weights are rebuilt from the optimizer's main
  shards (summed over DP ranks). Checked, on every rank and step: the step changed the weights;
  with the overlapped gather the parameters outside this rank's shard are still the pre-step
  ones right after ``step()`` (the gather really is deferred), without it they are complete;
  after the loop's guard (``ensure_params_gathered``) every trainable parameter equals the
  reference bit for bit, a second call is a no-op, and generation issues no parameter
  all-gather; the engine's prefill (first-token) logits equal those of an engine over an
  independent model loaded with the reference weights and differ from the pre-step logits of
  the same prompts; the sampled completions agree too.

Without the guard (checked by hand) the overlap case fails on ``forced``, ``guard_vs_ref`` and
``engine_gathered``; the logits still match, because megatron's forward pre-hooks sit on the
student's own submodules and gather inside the engine (the all-gather the guard keeps out of it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fast


def _cfg(*overrides):
    from vigos_megatron.config.loader import load_config
    from vigos_megatron.config.train import PretrainConfig

    return load_config(PretrainConfig, ROOT / "conf/tiny_cpu.yaml", ["run_dir=/nonexistent", *overrides])


def test_overlap_param_gather_is_validated():
    from vigos_megatron.config.loader import ConfigError
    from vigos_megatron.config.train import validate_layout

    with pytest.raises(ConfigError, match="optimizer.overlap_param_gather: only the distributed optimizer"):
        _cfg("optimizer.overlap_param_gather=true", "optimizer.distributed_optimizer=false")
    cfg = _cfg("optimizer.overlap_param_gather=true")
    with pytest.raises(ConfigError, match=r"optimizer.overlap_param_gather: needs data parallelism \(DP > 1\)"):
        validate_layout(cfg, 2)  # tp=2: DP=1
    assert validate_layout(_cfg("optimizer.overlap_param_gather=true", "parallel.tp=1"), 2).dp == 2
    assert _cfg().optimizer.overlap_param_gather is False


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("dp", [1, 2])
def test_overlap_param_gather_reaches_megatron(overlap, dp):
    import torch

    from vigos_megatron.config.train import OptimizerConfig
    from vigos_megatron.training.optimizer import ddp_config, megatron_optimizer_config

    cfg = OptimizerConfig(overlap_param_gather=overlap)
    want = overlap and dp > 1
    d = ddp_config(cfg, dp_size=dp)
    assert (d.use_distributed_optimizer, d.overlap_param_gather, d.align_param_gather) == (dp > 1, want, False)
    m = megatron_optimizer_config(cfg, params_dtype=torch.float32, dp_size=dp)
    assert (m.use_distributed_optimizer, m.overlap_param_gather) == (dp > 1, want)


# ----------------------------------------------------------------------------- slow (torchrun)


def _lines(out: str, tag: str) -> list[dict]:
    return [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith(tag + " ")]


@pytest.mark.slow
@pytest.mark.parametrize("overlap,steps", [(True, 2), (False, 1)], ids=["overlap_param_gather", "gather_in_step"])
def test_rollouts_after_a_step_use_the_post_step_weights(torchrun, tiny_demo_assets, tmp_path, overlap, steps):
    out = torchrun("dp_weights_worker.py", 2, tmp_path / "run", "1" if overlap else "0", str(steps),
                   timeout=300, env={"OMP_NUM_THREADS": "1"})
    initial = _lines(out, "DPW0")
    assert sorted(r["rank"] for r in initial) == [0, 1], out[-4000:]
    for r in initial:  # the reference path reproduces the engine on identical weights
        assert r["prompts"] >= 1 and r["ref_vs_engine"] == 0.0 and r["tokens_equal_ref"], r
    lines = _lines(out, "DPW")
    assert sorted((r["rank"], r["step"]) for r in lines) == [(k, s) for k in (0, 1) for s in range(1, steps + 1)], \
        out[-4000:]
    for r in lines:
        where = f"rank {r['rank']} step {r['step']}: {r}"
        assert r["overlap"] == overlap and r["applied"], where
        assert r["coverage_error"] == 0.0, where  # the optimizer shards partition every parameter
        assert r["ref_vs_pre"] > 1e-5, where  # the step moved the weights (the checks below are not vacuous)
        assert r["raw_vs_ref_owned"] == 0.0, where  # this rank's own shard is updated by step() itself
        if overlap:  # the other shards are still pre-step: the all-gather is pending
            assert r["raw_vs_pre_not_owned"] == 0.0 and r["raw_vs_ref_not_owned"] > 1e-5, where
            assert r["forced"], where
        else:  # gathered inside step()
            assert r["raw_vs_ref_not_owned"] == 0.0 and not r["forced"], where
        assert not r["forced_again"], where  # idempotent until the next step
        assert r["guard_vs_ref"] == 0.0, where  # every parameter is the post-step one before generating
        assert not r["engine_gathered"], where  # and generation needs no data-parallel all-gather
        # the rollouts' logits come from the post-step weights, not the pre-step ones
        assert r["logits_vs_ref"] <= 1e-6 * max(1.0, r["logits_scale"]), where
        assert r["logits_vs_before"] > 1e-3 * r["logits_scale"], where
        assert r["tokens_equal_ref"], where
