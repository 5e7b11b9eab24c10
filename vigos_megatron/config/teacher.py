"""What a teacher of its own (``model.teacher``) must share with the student, checked from the checkpoints'
files before any process group or model, and how its layers split over the pipeline stages.

The teacher scores the student's rows token for token: both models read the same ``input_ids`` (encoded
by the student's processor) and a loss compares their distributions over one vocabulary. So the pair
must agree on the family (``model_type``), the vocabulary size, the tokenizer (``tokenizer.json``: its
vocabulary, merges and added tokens), the special token ids of images and the image patching (patch,
temporal patch and spatial merge sizes: the number of image tokens of a prompt). Width, depth, heads,
intermediate size and the vision tower's own sizes may differ.

Layer split (:func:`stage_layers`): the teacher runs on the student's pipeline stages. ``counts[i]`` is
the number of its language-model layers on stage ``i``; megatron builds uneven splits only through the
first and last stage (``num_layers_in_first/last_pipeline_stage``), so the middle stages hold equal
counts. Default: the teacher's ``L_t`` layers as evenly as the student's, the remainder on the first
stage (``[L_t // pp + L_t % pp, L_t // pp, ...]``; Qwen3-VL's deepstack layers must be there anyway).
"""

from __future__ import annotations

import json
from pathlib import Path

from vigos_megatron.errors import ConfigError

#: top-level config keys that decide which token ids and how many image tokens a prompt has
_SHARED_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_SHARED_VISION = ("patch_size", "temporal_patch_size", "spatial_merge_size")


def stage_layers(n_layers: int, pp: int, configured=(), *, option: str = "model.teacher.pipeline_layers") -> list[int]:
    """The teacher's language-model layers per pipeline stage (see the module docstring)."""
    counts = [int(n) for n in configured]
    if not counts:
        base, rem = divmod(n_layers, pp)
        if base == 0:
            raise ConfigError(f"{option}: the teacher's {n_layers} layers cannot fill {pp} pipeline stages")
        counts = [base + rem] + [base] * (pp - 1)
    if len(counts) != pp:
        raise ConfigError(f"{option}: {len(counts)} counts for parallel.pp={pp} stages")
    if sum(counts) != n_layers:
        raise ConfigError(f"{option}: {counts} sum to {sum(counts)}, the teacher has {n_layers} layers")
    if min(counts) < 1:
        raise ConfigError(f"{option}: every stage needs at least one layer, got {counts}")
    if len(set(counts[1:-1])) > 1:
        raise ConfigError(f"{option}: {counts}: megatron splits layers unevenly only at the first and last "
                          "stage; the middle stages need equal counts")
    return counts


def provider_split(counts: list[int]) -> dict:
    """megatron's provider settings for ``counts`` (empty when the split is even)."""
    if len(set(counts)) <= 1:
        return {}
    return {"num_layers_in_first_pipeline_stage": counts[0], "num_layers_in_last_pipeline_stage": counts[-1]}


def read_config(option: str, hf_dir) -> dict:
    f = Path(hf_dir) / "config.json"
    if not f.is_file():
        raise ConfigError(f"{option}: {hf_dir}: no config.json")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option}: {f}: invalid JSON ({e})") from None


def _tokenizer(option: str, hf_dir) -> tuple:
    f = Path(hf_dir) / "tokenizer.json"
    if not f.is_file():
        raise ConfigError(f"{option}: {hf_dir}: no tokenizer.json, so the tokenizer cannot be compared with the "
                          "student's (copy the tokenizer files into the checkpoint directory)")
    tok = json.loads(f.read_text())
    model = tok.get("model", {})
    added = sorted((t["id"], t["content"]) for t in tok.get("added_tokens", []))
    return model.get("vocab"), model.get("merges"), added


def _text(raw: dict) -> dict:
    return raw.get("text_config", raw)


def check_pair(student_dir, teacher_dir, *, tp: int, pp: int, pipeline_layers=(),
               option: str = "model.teacher.hf_path") -> list[int]:
    """Refuse (:class:`ConfigError`, one line naming both directories) a teacher in ``teacher_dir`` that the
    student in ``student_dir`` cannot be distilled from at ``tp`` x ``pp``; returns its layers per stage."""
    s_raw, t_raw = read_config("model.hf_path", student_dir), read_config(option, teacher_dir)
    pair = f"(teacher {teacher_dir}, student {student_dir})"
    if s_raw.get("model_type") != t_raw.get("model_type"):
        raise ConfigError(f"{option}: the teacher is a {t_raw.get('model_type')!r} model, the student a "
                          f"{s_raw.get('model_type')!r} one; a teacher of another family is not supported {pair}")
    s_text, t_text = _text(s_raw), _text(t_raw)
    if s_text.get("vocab_size") != t_text.get("vocab_size"):
        raise ConfigError(f"{option}: vocabularies differ: the teacher has {t_text.get('vocab_size')} tokens, the "
                          f"student {s_text.get('vocab_size')} {pair}")
    for key in _SHARED_IDS:
        if s_raw.get(key) != t_raw.get(key):
            raise ConfigError(f"{option}: {key} differs: teacher {t_raw.get(key)}, student {s_raw.get(key)} {pair}")
    s_vis, t_vis = s_raw.get("vision_config", {}), t_raw.get("vision_config", {})
    for key in _SHARED_VISION:
        if s_vis.get(key) != t_vis.get(key):
            raise ConfigError(f"{option}: vision_config.{key} differs: teacher {t_vis.get(key)}, student "
                              f"{s_vis.get(key)} (the prompts' image tokens would not match) {pair}")
    s_tok, t_tok = _tokenizer("model.hf_path", student_dir), _tokenizer(option, teacher_dir)
    for what, a, b in zip(("vocabulary", "merges", "added tokens"), t_tok, s_tok):
        if a != b:
            raise ConfigError(f"{option}: the tokenizers differ in their {what} (tokenizer.json) {pair}")
    for key in ("num_attention_heads", "num_key_value_heads"):
        n = t_text.get(key)
        if n is not None and n % tp:
            raise ConfigError(f"parallel.tp: {tp} does not divide the teacher's {key}={n} {pair}")
    counts = stage_layers(t_text["num_hidden_layers"], pp, pipeline_layers)
    from vigos_megatron.models.family import vision_layout_problem

    problem = vision_layout_problem(tp=tp, pp=pp, num_layers=t_text["num_hidden_layers"],
                                    deepstack_layers=len(t_vis.get("deepstack_visual_indexes") or ()),
                                    vit_heads=t_vis.get("num_heads") if t_raw.get("model_type") == "qwen3_vl" else None,
                                    first_stage_layers=counts[0])
    if problem:
        raise ConfigError(f"{problem}: the teacher's {pair}")
    return counts


def teacher_hf_dir(teacher) -> Path:
    """The HF directory describing ``teacher`` (a :class:`~vigos_megatron.config.model.TeacherConfig` that is
    ``separate``): ``hf_path``, or the ``hf/`` files stored with the Megatron checkpoint ``init_checkpoint``."""
    if teacher.hf_path:
        return Path(teacher.hf_path)
    from vigos_megatron.convert.megatron_checkpoint import hf_dir_of, resolve_checkpoint

    return hf_dir_of(resolve_checkpoint(teacher.init_checkpoint))
