"""HF <-> Megatron converters (single process): bit-exact round trips, CLI, refusals."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vigos_megatron.testing.tiny_qwen import write_tiny_checkpoint

    base = tmp_path_factory.mktemp("conv")
    return {
        "untied": write_tiny_checkpoint(base / "untied", tie_word_embeddings=False, seed=0),
        "tied": write_tiny_checkpoint(base / "tied", tie_word_embeddings=True, seed=1),
    }


def assert_bit_exact(a_dir, b_dir):
    """Same tensor names AS STORED (key layout preserved), dtypes and bits."""
    from vigos_megatron.convert.converters import load_hf_state

    a, b = load_hf_state(a_dir, canonical=False), load_hf_state(b_dir, canonical=False)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    return len(a)


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_hf_megatron_hf_round_trip_is_bit_exact(tiny, tmp_path, kind):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vigos_megatron.convert.converters import hf_to_megatron, megatron_to_hf

    ckpt = hf_to_megatron(tiny[kind], tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert (ckpt / "hf" / "config.json").is_file() and (ckpt / "hf" / "tokenizer.json").is_file()
    megatron_to_hf(tmp_path / "run", tmp_path / "back", quiet=True)
    n = assert_bit_exact(tiny[kind], tmp_path / "back")
    print(f"{kind}: {n} tensors bit-exact")
    for f in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert (tmp_path / "back" / f).is_file(), f
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "back")
    assert model.config.tie_word_embeddings == (kind == "tied")


def test_round_trip_keeps_the_current_key_layout(tiny, tmp_path):
    """A source in transformers' current layout (model.language_model.*) comes back in it."""
    from vigos_megatron.convert.converters import hf_to_megatron, megatron_to_hf
    from vigos_megatron.models.hf_checkpoint import canonical_hf_name, stored_key_layout

    src = tmp_path / "current"
    shutil.copytree(tiny["untied"], src)
    assert stored_key_layout(src) == "hub"
    _rewrite_safetensors(src, lambda sd: {canonical_hf_name(k): v for k, v in sd.items()})
    assert stored_key_layout(src) == "current"
    hf_to_megatron(src, tmp_path / "run", quiet=True)
    megatron_to_hf(tmp_path / "run", tmp_path / "back", quiet=True)
    assert stored_key_layout(tmp_path / "back") == "current"
    assert_bit_exact(src, tmp_path / "back")


def test_cli_round_trip_with_sharded_output(tiny, tmp_path):
    from vigos_megatron.testing.distributed import subprocess_env

    env = subprocess_env()  # the caller's environment, PYTHONPATH kept (a GPU image installs packages there)
    r = subprocess.run([sys.executable, str(ROOT / "tools/convert_hf_to_megatron.py"), "--hf-model",
                        str(tiny["untied"]), "--output", str(tmp_path / "run")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Loading from" in r.stdout + r.stderr  # the bridge's per-tensor progress
    r = subprocess.run([sys.executable, str(ROOT / "tools/convert_megatron_to_hf.py"), "--checkpoint",
                        str(tmp_path / "run" / "iter_0000000"), "--output", str(tmp_path / "hf"),
                        "--max-shard-gb", str(200_000 / 2**30)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "writing HF tensors" in r.stderr  # per-tensor progress
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # several shards
    assert_bit_exact(tiny["untied"], tmp_path / "hf")
    r = subprocess.run([sys.executable, str(ROOT / "tools/convert_megatron_to_hf.py"), "--checkpoint",
                        str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 2 and "no such checkpoint directory" in r.stderr


def _rewrite_safetensors(hf_dir, fn):
    from safetensors.torch import load_file, save_file

    f = hf_dir / "model.safetensors"
    save_file(fn(load_file(str(f))), str(f), metadata={"format": "pt"})


def test_hf_to_megatron_refusals(tiny, tmp_path):
    from vigos_megatron.convert.converters import hf_to_megatron
    from vigos_megatron.models.hf_checkpoint import CheckpointError
    from vigos_megatron.models.builder import ModelBuildError

    with pytest.raises(ModelBuildError, match="no config.json"):
        hf_to_megatron(tmp_path, tmp_path / "o1", quiet=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ModelBuildError, match="model_type is .qwen2.; supported: .qwen2_5_vl., .qwen3_vl."):
        hf_to_megatron(other, tmp_path / "o2", quiet=True)

    missing = shutil.copytree(tiny["untied"], tmp_path / "missing")
    _rewrite_safetensors(missing, lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(CheckpointError, match=r"missing tensor model\.language_model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_to_megatron(missing, tmp_path / "o3", quiet=True)

    bad = shutil.copytree(tiny["untied"], tmp_path / "bad")
    _rewrite_safetensors(bad, lambda sd: {k: (v[:-1] if "layers.0.self_attn.k_proj.weight" in k else v)
                                          for k, v in sd.items()})
    with pytest.raises(CheckpointError, match=r"shape mismatch for model\.language_model\.layers\.0\.self_attn\.k_proj"
                                              r"\.weight in model\.safetensors: stored \[31, 64\], config\.json implies \[32, 64\]"):
        hf_to_megatron(bad, tmp_path / "o4", quiet=True)

    nofiles = shutil.copytree(tiny["untied"], tmp_path / "nofiles")
    (nofiles / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf_to_megatron(nofiles, tmp_path / "o5", quiet=True)


def test_megatron_to_hf_refusals(tiny, tmp_path):
    from vigos_megatron.convert.converters import hf_to_megatron, megatron_to_hf
    from vigos_megatron.models.hf_checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not a Megatron distributed checkpoint"):
        megatron_to_hf(tiny["untied"], tmp_path / "x", quiet=True)
    run = tmp_path / "run"
    ckpt = hf_to_megatron(tiny["tied"], run, quiet=True)
    (run / "latest_checkpointed_iteration.txt").write_text("5\n")
    with pytest.raises(CheckpointError, match="names iteration 5 but .*iter_0000005 does not exist"):
        megatron_to_hf(run, tmp_path / "x", quiet=True)
    cfg_file = ckpt / "hf" / "config.json"
    original = json.loads(cfg_file.read_text())

    untied = dict(original, tie_word_embeddings=False)  # needs an output layer the checkpoint lacks
    cfg_file.write_text(json.dumps(untied))
    with pytest.raises(CheckpointError, match=r"missing tensor language_model\.output_layer\.weight"):
        megatron_to_hf(ckpt, tmp_path / "y", quiet=True)

    wider = json.loads(json.dumps(original))
    wider["text_config"]["intermediate_size"] = 256
    cfg_file.write_text(json.dumps(wider))
    with pytest.raises(CheckpointError, match=r"shape mismatch for language_model\.decoder\.layers\.mlp\.linear_fc2\.weight"):
        megatron_to_hf(ckpt, tmp_path / "z", quiet=True)


def test_import_verification_catches_an_inexact_tensor(tiny):
    """verify_against_hf fails, naming the tensor, when one imported weight differs from the source."""
    from vigos_megatron.convert.converters import load_hf_into, verify_against_hf
    from vigos_megatron.models.hf_checkpoint import CheckpointError
    from vigos_megatron.startup import local_model_parallel
    from vigos_megatron.models.builder import QwenVLBuilder

    with local_model_parallel():
        builder = QwenVLBuilder.from_hf(tiny["untied"])
        chunks = builder.build(init_weights=False)
        load_hf_into(builder, chunks, tiny["untied"])
        assert verify_against_hf(builder, chunks, tiny["untied"]) > 50
        name, p = next((n, p) for n, p in chunks[0].named_parameters() if n.endswith("final_layernorm.weight"))
        with torch.no_grad():
            p.add_(1e-3)
        with pytest.raises(CheckpointError, match=r"norm\.weight: differs from the source"):
            verify_against_hf(builder, chunks, tiny["untied"])
