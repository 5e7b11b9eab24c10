"""One sample record -> image tensors + the token-id prefixes of every ViGOS context.

Contexts (``../shared/METHOD.md`` sections 1-4; texts from ``conf/prompts/vigos.yaml``):

=============  =======  ======================================================  ===============
context        image    user text                                               assistant prefill
=============  =======  ======================================================  ===============
student        yes      model-card student prompt with the problem              ``<description>``
perception     yes      none (image only)                                       ``<description>``
reasoning      yes      problem + reference answer + reasoning format           ``<think>``
reference      yes      problem + reference answer + full format                ``<description>``
opsd           yes      same as reference (vanilla OPSD privileged teacher)     ``<description>``
student_text   no       student prompt (VGS ``x``)                              ``<description>``
opsd_text      no       OPSD privileged prompt (VGS ``x, answer``)              ``<description>``
=============  =======  ======================================================  ===============

Each context is rendered through the tokenizer's chat template (with the template's ``system``
message, or the chat template's default one) with ``add_generation_prompt=True``, then the prefill is appended and the
whole string is tokenised once. These are PREFIXES: the student's completion tokens are
appended after the rollout. The single ``<|image_pad|>`` of an image context is expanded to
``t*h*w / merge**2`` copies, exactly as the processor does. The image is decoded, resized and
patchified once per sample and shared by all image contexts.

With ``reasoning_teacher_sees_description`` the reasoning context uses the template's
``text_with_description`` / ``prefill_with_description``; appending the student's
description tokens is the job of context assembly after the rollout.

A sample whose longest context exceeds ``max_prompt_tokens`` is dropped
(:class:`~vigos_megatron.data.loader.DropSample`), never truncated.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vigos_megatron.data.images import load_image, num_image_tokens, vision_inputs
from vigos_megatron.data.loader import DropSample
from vigos_megatron.data.prompts import PromptTemplates, load_templates


class ContextEncoder:
    """``encode(key, record, image_bytes) -> dict``; picklable (the processor loads lazily per process).

    Output: ``pixel_values`` [num_patches, C*T*P*P] float32, ``image_grid_thw`` [1, 3] int64,
    ``num_image_tokens`` (int), ``contexts`` {name: int64 [L_name]}, ``image_size`` (w, h) after
    resizing, and ``id``, ``problem``, ``answer``, ``answer_raw``, ``source`` from the record.
    """

    def __init__(
        self,
        processor_path: str | Path,
        templates: PromptTemplates | str | Path,
        *,
        min_pixels: int,
        max_pixels: int,
        max_prompt_tokens: int,
        contexts=("student", "perception", "reasoning", "reference", "opsd", "student_text", "opsd_text"),
        reasoning_teacher_sees_description: bool = False,
    ):
        self.processor_path = str(processor_path)
        self.templates = templates if isinstance(templates, PromptTemplates) else load_templates(templates)
        missing = [c for c in contexts if c not in self.templates.contexts]
        if missing:
            raise ValueError(f"contexts {missing} have no prompt template (templates define {sorted(self.templates.contexts)})")
        self.min_pixels, self.max_pixels, self.max_prompt_tokens = min_pixels, max_pixels, max_prompt_tokens
        self.context_names = tuple(contexts)
        self.sees_description = reasoning_teacher_sees_description
        self._processor = None

    @classmethod
    def from_config(cls, cfg) -> "ContextEncoder":
        """From a :class:`vigos_megatron.config.data.ContextConfig`."""
        return cls(cfg.processor_path, cfg.prompts_path, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                   max_prompt_tokens=cfg.max_prompt_tokens, contexts=tuple(cfg.contexts),
                   reasoning_teacher_sees_description=cfg.reasoning_teacher_sees_description)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_processor"] = None
        return state

    @property
    def processor(self):
        if self._processor is None:
            from transformers import AutoProcessor

            self._processor = AutoProcessor.from_pretrained(self.processor_path)
            tok = self._processor.tokenizer
            self._image_pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
            if self._image_pad_id is None or self._image_pad_id == tok.unk_token_id:
                raise ValueError(f"{self.processor_path}: tokenizer has no <|image_pad|> token")
        return self._processor

    def render(self, name: str, problem: str, answer: str) -> str:
        """Chat-template text of context ``name`` including the assistant prefill (one ``<|image_pad|>``)."""
        tpl = self.templates.contexts[name]
        with_desc = self.sees_description and name == "reasoning"
        text = self.templates.render_text(name, problem=problem, answer=answer, with_description=with_desc)
        content = []
        if tpl.image:
            content.append({"type": "image"})
        if text is not None:
            content.append({"type": "text", "text": text})
        system = [] if tpl.system is None else [{"role": "system", "content": tpl.system}]
        rendered = self.processor.tokenizer.apply_chat_template(
            system + [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return rendered + self.templates.prefill(name, with_description=with_desc)

    def token_ids(self, text: str, n_image_tokens: int, *, has_image: bool, name: str) -> torch.Tensor:
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        pads = [i for i, t in enumerate(ids) if t == self._image_pad_id]
        if len(pads) != (1 if has_image else 0):
            raise DropSample(f"context {name}: expected {int(has_image)} <|image_pad|>, found {len(pads)} "
                             "(does the problem contain image tokens?)")
        if has_image:
            i = pads[0]
            ids = ids[:i] + [self._image_pad_id] * n_image_tokens + ids[i + 1 :]
        return torch.tensor(ids, dtype=torch.long)

    def __call__(self, key: str, record: dict, image_bytes: bytes) -> dict:
        proc = self.processor
        ip = proc.image_processor
        try:
            image = load_image(image_bytes, min_pixels=self.min_pixels, max_pixels=self.max_pixels, patch_size=ip.patch_size)
        except Exception as e:
            raise DropSample(f"image: {type(e).__name__}: {e}") from None
        pixel_values, grid = vision_inputs(image, ip)
        n_img = num_image_tokens(grid, ip.merge_size)
        problem, answer = record["problem"], record.get("answer") or ""
        contexts = {}
        for name in self.context_names:
            has_image = self.templates.contexts[name].image
            ids = self.token_ids(self.render(name, problem, answer), n_img, has_image=has_image, name=name)
            if ids.numel() > self.max_prompt_tokens:
                raise DropSample(f"prompt too long: context {name} has {ids.numel()} tokens > "
                                 f"max_prompt_tokens {self.max_prompt_tokens}")
            contexts[name] = ids
        return {
            "id": record.get("id"),
            "problem": problem,
            "answer": answer,
            "answer_raw": record.get("answer_raw"),
            "source": record.get("source"),
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
            "num_image_tokens": n_img,
            "image_size": image.size,
            "contexts": contexts,
        }


class PrefixCut:
    """``cut(prefix, lead) -> prefix'``: a context prefix re-encoded without its last bytes ``lead``.

    A teacher that reads the student's completion from a span on appends the span's first token
    after its own prefix. When that token starts with bytes that belong before the span (Qwen's
    byte-level BPE makes ``>The`` one token after ``<think``), the text read must still be
    ``prefix text + the completion's bytes from the span's first byte`` (``../shared/METHOD.md``
    section 1): the prefix gives those ``lead`` bytes up and the token supplies them, so
    ``decode(prefix') + decode(token...) == decode(prefix) + span bytes`` byte for byte.

    The tokenizer splits text at every added token (``<|im_start|>``, ``<|image_pad|>``, ...)
    before BPE, so only the text after the prefix's last added token is re-encoded; the result is
    the tokenizer's own encoding of the cut text. ``prefix`` is int64 ``[L]``; the result is int64
    ``[L']`` (``L' - L`` is small and may be negative or positive). Results are cached per
    (tail ids, lead): every sample's prefix of one context ends the same way.
    """

    def __init__(self, tokenizer):
        from vigos_megatron.rollout.segments import _unwrap_processor, token_bytes_for

        self._tok = _unwrap_processor(tokenizer)
        self._bytes = token_bytes_for(self._tok)
        self._cache: dict[tuple[tuple[int, ...], bytes], list[int]] = {}

    def __call__(self, prefix: torch.Tensor, lead: bytes) -> torch.Tensor:
        if not lead:
            return prefix
        ids = prefix.tolist()
        added = self._bytes.added_ids
        q = len(ids) - 1
        while q >= 0 and ids[q] not in added:
            q -= 1
        tail = tuple(ids[q + 1:])
        new = self._cache.get((tail, lead))
        if new is None:
            text = b"".join(self._bytes(tail))
            if not text.endswith(lead):
                raise ValueError(f"byte-exact context: the prefix ends in {text[-len(lead) - 8:]!r}, not in the "
                                 f"{lead!r} that the completion's first scored token carries")
            want = text[: len(text) - len(lead)]
            new = self._tok(want.decode("utf-8"), add_special_tokens=False)["input_ids"] if want else []
            if b"".join(self._bytes(new)) != want:
                raise ValueError(f"byte-exact context: {want!r} does not re-encode to itself")
            self._cache[(tail, lead)] = new
        return torch.cat([prefix[: q + 1], torch.tensor(new, dtype=prefix.dtype, device=prefix.device)])
