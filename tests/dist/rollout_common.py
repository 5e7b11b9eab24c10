"""Shared by tests/test_rollout_engine.py and the rollout workers: prompts, the HF reference, stops.

Prompts are the ViGOS student context built by :class:`~vigos_megatron.data.contexts.ContextEncoder`
(chat template + ``<description>`` prefill, image placeholders expanded) for two records with
different images and problems, so the two prompts differ in length.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPTS_YAML = ROOT / "conf" / "prompts" / "vigos.yaml"
MAX_NEW = 16

RECORDS = [
    # (problem, image width, image height, image seed)
    ("How many red circles are there?", 84, 56, 1),
    ("What is the total length of the two sides shown in the figure, in centimetres?", 112, 84, 2),
]


#: language-model query/key weights are multiplied by this in the test checkpoint (see write_rollout_checkpoint)
ATTENTION_SHARPENING = 20.0


def _hf_model_class(hf_dir):
    from transformers import AutoConfig

    from vigos_megatron.models.family import family_for_config

    return family_for_config(AutoConfig.from_pretrained(hf_dir)).hf_model_class()


def write_rollout_checkpoint(out_dir, family: str = "qwen2_5_vl") -> Path:
    """The tiny random Qwen2.5-VL (or Qwen3-VL) with sharpened attention (query and key weights x ``ATTENTION_SHARPENING``).

    With HF's initialisation (std 0.02) attention is nearly uniform, so greedy tokens hardly depend
    on positions or on which keys are masked: a wrong mrope offset or an unmasked padding column
    would still reproduce HF's tokens. Sharpened attention makes the token-for-token comparison
    sensitive to both (and the completions stop being short repetitive cycles).
    """
    import importlib

    import torch

    writer = {"qwen2_5_vl": "vigos_megatron.testing.tiny_qwen", "qwen3_vl": "vigos_megatron.testing.tiny_qwen3_vl"}[family]
    out = importlib.import_module(writer).write_tiny_checkpoint(out_dir)
    model = _hf_model_class(out).from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and (".q_proj.weight" in name or ".k_proj.weight" in name):
                p.mul_(ATTENTION_SHARPENING)
    model.save_pretrained(out, safe_serialization=True)
    return out


def student_prompts(hf_dir, *, first_sample_id: int = 0):
    """Two image+text :class:`RolloutPrompt` s (the student context), different lengths."""
    from vigos_megatron.data.contexts import ContextEncoder
    from vigos_megatron.data.synthetic import image_bytes
    from vigos_megatron.rollout.engine import RolloutPrompt

    enc = ContextEncoder(hf_dir, PROMPTS_YAML, min_pixels=56 * 56, max_pixels=112 * 112, max_prompt_tokens=4096,
                         contexts=("student",))
    out = []
    for i, (problem, w, h, seed) in enumerate(RECORDS):
        rec = enc(f"k{i}", {"id": f"r{i}", "problem": problem, "answer": "3"}, image_bytes(w, h, seed=seed))
        out.append(RolloutPrompt(input_ids=rec["contexts"]["student"], pixel_values=rec["pixel_values"],
                                 image_grid_thw=rec["image_grid_thw"], sample_id=first_sample_id + i))
    lengths = {p.input_ids.numel() for p in out}
    assert len(lengths) == len(out), "test prompts must differ in length"
    return out


def stop_ids(hf_dir) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    return [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]


def hf_greedy(hf_dir, prompts, *, max_new: int = MAX_NEW, stops=None) -> list[list[int]]:
    """Hugging Face ``generate`` (greedy, KV cache), one prompt at a time (no padding): new ids per prompt."""
    import torch

    stops = stops or stop_ids(hf_dir)
    hf = _hf_model_class(hf_dir).from_pretrained(hf_dir, dtype=torch.float32).eval()
    image_id = hf.config.image_token_id
    out = []
    for p in prompts:
        ids = p.input_ids[None]
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                      mm_token_type_ids=(ids == image_id).to(torch.int))
        if p.pixel_values is not None:
            kwargs.update(pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw)
        with torch.no_grad():
            gen = hf.generate(**kwargs, max_new_tokens=max_new, do_sample=False, eos_token_id=list(stops),
                              pad_token_id=stops[-1])
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def early_stop_token(reference: list[list[int]]) -> int:
    """A token that one row generates early (index >= 1) and the other never does: that row stops first."""
    for a, b in ((0, 1), (1, 0)):
        for t in reference[a][1:-1]:
            if t not in reference[b]:
                return t
    raise AssertionError(f"every token of one row also appears in the other: {reference}")


def truncate_at(ids: list[int], stops) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids


#: sampling settings exercised at every layout (model card defaults; nucleus without top-k; plain sampling)
SAMPLING_CASES = {
    "card": dict(seed=7),
    "nucleus": dict(top_k=0, top_p=0.9, temperature=1.0, seed=8),
    "plain": dict(top_k=0, top_p=1.0, temperature=1.0, seed=9),
}
SAMPLING_STEP = 3


def sampling_config(name: str, **extra):
    from vigos_megatron.config.sampling import SamplingConfig

    return SamplingConfig(**{"max_new_tokens": MAX_NEW, **SAMPLING_CASES[name], **extra})
