"""VGS eta diagnostics (``loss.vgs.eta_diagnostics_interval``): the polarisation math, and inside the
training schedule (slow: ``tests/dist/vgs_diagnostics_worker.py``) the probes' norms against gradients
combined by hand, and the update unchanged with the diagnostics on and off (with ``reduction: sequence``)."""

import json
import math

import pytest
import torch

from vigos_megatron.objectives.vgs import eta_diagnostics


def test_eta_diagnostics_from_three_norms_equal_the_vectors():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    b += 0.5 * a  # correlated
    for gamma in (2.0, 0.0):
        m = eta_diagnostics({"std": float(a.norm()), "vis": float(b.norm()), "std+vis": float((a + b).norm())}, gamma)
        assert m["vgs/grad_norm_std"] == float(a.norm()) and m["vgs/grad_norm_vis"] == float(b.norm())
        assert m["vgs/grad_cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-12)
        assert m["vgs/implied_eta"] == pytest.approx(float(a.norm() / (a + gamma * b).norm()), rel=1e-12)
    zero = eta_diagnostics({"std": 0.0, "vis": 1.0, "std+vis": 1.0}, 2.0)
    assert math.isnan(zero["vgs/grad_cosine"]) and zero["vgs/implied_eta"] == 0.0


@pytest.mark.slow
def test_diagnostics_in_the_schedule_equal_hand_norms_and_leave_the_update_unchanged(torchrun, tiny_demo_assets,
                                                                                      tmp_path):
    out = torchrun("vgs_diagnostics_worker.py", 1, tmp_path, timeout=600, env={"OMP_NUM_THREADS": "1"})
    r = json.loads(next(x for x in out.splitlines() if x.startswith("DIAG ")).split(" ", 1)[1])
    assert r["probes"] == r["expected_probes"] and r["none_at_step_2"]
    for key, hand in r["hand"].items():
        assert r["metrics"][key] == pytest.approx(hand, rel=1e-5, abs=1e-7), key
    assert r["sum_probe_rel"] < 1e-5  # the probes' gradients are linear in their weights
    eta = r["metrics"]["vgs/implied_eta"]
    assert math.isfinite(eta) and eta > 0 and r["hand"]["vgs/grad_norm_vis"] > 0
    assert r["step_gradient_unchanged"] and r["step_grad_norm"] > 0
    on, off = r["metrics_on"], r["metrics_off"]
    assert len(on) == len(off) == 2
    same = ("loss", "grad_norm", "term/l_std", "term/l_vis", "term/l_lp", "rollout_accuracy", "invalid_rate")
    for a, b in zip(on, off):
        assert {k: a[k] for k in same} == {k: b[k] for k in same}  # bit for bit (step 2 reads step 1's update)
        assert "vgs/implied_eta" in a and "vgs/implied_eta" not in b
