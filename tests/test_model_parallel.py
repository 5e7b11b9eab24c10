"""Qwen2.5-VL under TP/PP on gloo: logit parity with HF, frozen teacher, checkpoint reload at TP2xPP2.

Each launch (tests/dist/model_parallel.py) checks parity, the teacher replica and its memory;
the TP2xPP2 launch also reloads converter checkpoints (tied and untied) and saves them again
with optimizer-like entries, which must convert back to HF bit-exactly.
"""

import re

import pytest

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vigos_megatron.testing.tiny_qwen import write_tiny_checkpoint

    base = tmp_path_factory.mktemp("par")
    return {
        "base": base,
        "untied": write_tiny_checkpoint(base / "untied", tie_word_embeddings=False, seed=0),
        "tied": write_tiny_checkpoint(base / "tied", tie_word_embeddings=True, seed=1),
    }


def results(out: str) -> dict:
    # not anchored to line starts: output of concurrent ranks may interleave
    return dict(re.findall(r"RESULT (\w+)=(\S+)", out))


def check_common(r: dict, layout: str):
    diff = float(r["parity_max_abs_diff"])
    print(f"{layout}: max abs logit diff {diff:.3e}; teacher {r['teacher_param_bytes_model_parallel_total']} bytes "
          f"over the model-parallel group ({r['teacher_local_param_bytes_rank0']} on rank 0)")
    assert diff <= TOL
    assert r["has_visual_on_first_stage"] == "1"
    assert float(r["teacher_vs_student_logit_diff"]) == 0.0
    assert int(r["student_params_with_grad"]) > 0 and int(r["student_params_changed"]) > 0
    assert r["teacher_params_with_grad_or_requires_grad"] == "0"
    assert r["teacher_params_changed"] == "0"
    assert r["teacher_is_ddp"] == "0"


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parity_and_teacher(torchrun, tiny, tp, pp):
    r = results(torchrun("model_parallel.py", tp * pp, "--tp", tp, "--pp", pp, "--hf", tiny["untied"]))
    check_common(r, f"TP={tp} PP={pp}")
    # all 207,072 fp32 parameters are held once over the model-parallel group, except the
    # vision tower and norms, which every TP rank replicates
    total = int(r["teacher_param_bytes_model_parallel_total"])
    assert total == 207_072 * 4 if tp == 1 else total > 207_072 * 4


@pytest.mark.slow
def test_tp2xpp2_parity_teacher_and_checkpoint_reload_round_trip(torchrun, tiny):
    from test_convert import assert_bit_exact

    from vigos_megatron.convert.converters import hf_to_megatron, megatron_to_hf

    base = tiny["base"]
    args = []
    for kind in ("untied", "tied"):
        hf_to_megatron(tiny[kind], base / f"run_{kind}", quiet=True)
        args += ["--reload", base / f"run_{kind}", base / f"resaved_{kind}"]
    r = results(torchrun("model_parallel.py", 4, "--tp", 2, "--pp", 2, "--hf", tiny["untied"], *args))
    check_common(r, "TP=2 PP=2")
    for kind in ("untied", "tied"):
        resaved = base / f"resaved_{kind}"
        assert (resaved / "latest_checkpointed_iteration.txt").read_text().strip() == "7"
        info = (resaved / "iter_0000007" / "vigos_checkpoint.json").read_text()
        assert '"tensor_model_parallel_size": 2' in info and '"pipeline_model_parallel_size": 2' in info
        megatron_to_hf(resaved, base / f"back_{kind}", quiet=True)  # optimizer entries present, ignored
        n = assert_bit_exact(tiny[kind], base / f"back_{kind}")
        print(f"{kind}: {n} tensors bit-exact after TP2xPP2 reload + save")
