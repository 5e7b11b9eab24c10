"""Prompt templates of the training contexts, loaded from YAML (``conf/prompts/vigos.yaml``,
``conf/prompts/vgs.yaml``).

A template file has ``format`` (the completion format its prompts ask for, which selects the
completion parser: :data:`TEMPLATE_FORMATS`, :mod:`vigos_megatron.rollout.formats`; default
``vigos``), ``reference_block: {present, missing}`` and ``contexts: {name: spec}``
where a spec has ``image`` (bool: the image comes first in the user turn), ``text`` (str or
null: the user text after the image), ``prefill`` (str: the start of the assistant turn),
``system`` (str or null: the system message; null: the chat template's default),
optionally ``prefill_with_description`` / ``text_with_description`` (used by the reasoning
context when ``reasoning_teacher_sees_description`` is on) and ``inherit`` (copy another
context, then override). Only the placeholders ``{problem}`` and ``{reference_block}`` (and
``{answer}`` inside ``reference_block.present``) are substituted, in one pass: other braces
(``\\boxed{}``) are literal, and a problem that itself contains ``{answer}`` is left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vigos_megatron.config.loader import ConfigError

_FIELDS = {"image", "text", "prefill", "system", "prefill_with_description", "text_with_description", "inherit"}
#: completion formats a template may ask for: ``vigos`` (<description>, <think>, box), ``vgs`` (<reason>, box)
TEMPLATE_FORMATS = ("vigos", "vgs")
_PLACEHOLDER = re.compile(r"\{(problem|reference_block|answer)\}")


@dataclass(frozen=True)
class ContextTemplate:
    name: str
    image: bool
    text: str | None
    prefill: str
    system: str | None = None
    prefill_with_description: str | None = None
    text_with_description: str | None = None


@dataclass(frozen=True)
class PromptTemplates:
    contexts: dict
    answer_present: str
    answer_missing: str
    #: the completion format the prompts ask for (one of :data:`TEMPLATE_FORMATS`)
    format: str = "vigos"

    def reference_block(self, answer: str) -> str:
        """The reference-answer sentence: ``present`` with the answer, or ``missing`` when it is empty."""
        if not answer:
            return self.answer_missing
        return _substitute(self.answer_present, {"answer": answer})

    def render_text(self, name: str, *, problem: str, answer: str, with_description: bool = False) -> str | None:
        """User text of context ``name`` (None when the context has no text: perception)."""
        t = self.contexts[name]
        text = t.text_with_description if with_description and t.text_with_description is not None else t.text
        if text is None:
            return None
        return _substitute(text, {"problem": problem, "reference_block": self.reference_block(answer)})

    def prefill(self, name: str, *, with_description: bool = False) -> str:
        t = self.contexts[name]
        if with_description:
            if t.prefill_with_description is None:
                raise ConfigError(f"prompt template {name!r}: prefill_with_description is needed when the "
                                  "reasoning teacher sees the description")
            return t.prefill_with_description
        return t.prefill


def _substitute(template: str, values: dict) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)


def load_templates(path: str | Path) -> PromptTemplates:
    """Parse and validate a template file; errors name the file and the context/field."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt templates: file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("contexts"), dict):
        raise ConfigError(f"{p}: expected a mapping with a 'contexts' mapping")
    block = raw.get("reference_block") or {}
    if not isinstance(block.get("present"), str) or not isinstance(block.get("missing"), str):
        raise ConfigError(f"{p}: reference_block needs string fields 'present' and 'missing'")
    if "{answer}" not in block["present"]:
        raise ConfigError(f"{p}: reference_block.present must contain {{answer}}")
    fmt = raw.get("format", "vigos")
    if fmt not in TEMPLATE_FORMATS:
        raise ConfigError(f"{p}: format: must be one of {', '.join(TEMPLATE_FORMATS)}, got {fmt!r}")
    specs = raw["contexts"]

    def resolve(name: str, seen: tuple = ()) -> dict:
        if name in seen:
            raise ConfigError(f"{p}: contexts.{name}: inherit cycle {' -> '.join(seen + (name,))}")
        spec = specs.get(name)
        if not isinstance(spec, dict):
            raise ConfigError(f"{p}: contexts.{seen[-1] if seen else name}: unknown or invalid context {name!r}")
        unknown = set(spec) - _FIELDS
        if unknown:
            raise ConfigError(f"{p}: contexts.{name}: unknown field(s) {sorted(unknown)}; allowed {sorted(_FIELDS)}")
        base = resolve(spec["inherit"], seen + (name,)) if "inherit" in spec else {}
        return {**base, **{k: v for k, v in spec.items() if k != "inherit"}}

    contexts = {}
    for name in specs:
        spec = resolve(name)
        where = f"{p}: contexts.{name}"
        if not isinstance(spec.get("image"), bool):
            raise ConfigError(f"{where}.image: must be true or false")
        if not isinstance(spec.get("prefill"), str):
            raise ConfigError(f"{where}.prefill: must be a string")
        for f in ("text", "system", "text_with_description", "prefill_with_description"):
            if spec.get(f) is not None and not isinstance(spec[f], str):
                raise ConfigError(f"{where}.{f}: must be a string or null")
        if spec.get("text") is None and not spec["image"]:
            raise ConfigError(f"{where}: a context needs an image or a text")
        contexts[name] = ContextTemplate(
            name=name, image=spec["image"], text=spec.get("text"), prefill=spec["prefill"], system=spec.get("system"),
            prefill_with_description=spec.get("prefill_with_description"),
            text_with_description=spec.get("text_with_description"),
        )
    return PromptTemplates(contexts=contexts, answer_present=block["present"], answer_missing=block["missing"],
                           format=fmt)
