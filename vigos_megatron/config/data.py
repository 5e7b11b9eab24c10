"""Configuration of the data pipeline: shards -> streaming loader -> image + prompt contexts.

Loaded with ``load_config(DataConfig, "conf/data/vision_sr1_47k.yaml", overrides)``; every
``validate()`` raises :class:`ConfigError` naming the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vigos_megatron.errors import ConfigError, require_at_least

#: qwen-vl-utils' default image bounds, in language-model image tokens (``unit x unit`` pixels each)
DEFAULT_MIN_IMAGE_TOKENS, DEFAULT_MAX_IMAGE_TOKENS = 4, 16384

#: every context :mod:`vigos_megatron.data.contexts` can build (``../shared/METHOD.md`` sections 1-4)
CONTEXT_NAMES = ("student", "perception", "reasoning", "reference", "opsd", "student_text", "opsd_text")


@dataclass
class LoaderConfig:
    """Streaming over the shards written by ``tools/make_webdataset.py``."""

    #: directory holding ``manifest.json``, ``index.json`` and the ``shard-*.tar`` files
    shards_dir: str = ""
    #: prompts per data-parallel rank per batch
    batch_size: int = 1
    #: DataLoader worker processes per rank (0: load in the main process)
    num_workers: int = 2
    prefetch_factor: int = 2
    seed: int = 1234
    #: shuffle the shard order every epoch
    shuffle_shards: bool = True
    #: samples held in the shuffle buffer (<= 1: no sample-level shuffle)
    shuffle_buffer: int = 1000

    def validate(self) -> None:
        if not self.shards_dir:
            raise ConfigError("shards_dir: must be set (a directory written by tools/make_webdataset.py)")
        require_at_least(self, 1, "batch_size")
        require_at_least(self, 0, "num_workers")
        require_at_least(self, 1, "prefetch_factor")
        require_at_least(self, 0, "seed")


@dataclass
class ContextConfig:
    """Image sizing and prompt contexts (``../shared/METHOD.md`` section 2)."""

    #: local directory of the HF processor (tokenizer + chat template + image processor)
    processor_path: str = ""
    #: YAML file of prompt templates (``conf/prompts/vigos.yaml``)
    prompts_path: str = "conf/prompts/vigos.yaml"
    #: qwen-vl-utils ``smart_resize`` bounds in pixels, in the model family's unit: one language-model
    #: image token covers ``unit x unit`` pixels (patch x spatial merge: 28 on Qwen2.5-VL, 32 on Qwen3-VL),
    #: and image sides are multiples of ``unit``; 0: qwen-vl-utils' defaults, 4 and 16,384 tokens
    #: (:meth:`pixel_bounds`)
    min_pixels: int = 0
    max_pixels: int = 0
    #: a sample whose longest context prompt exceeds this many tokens is dropped and counted
    max_prompt_tokens: int = 32768
    #: which contexts to build (subset of CONTEXT_NAMES)
    contexts: list[str] = field(default_factory=lambda: list(CONTEXT_NAMES))
    #: paper wording: the reasoning teacher also sees the student's description (released code: False)
    reasoning_teacher_sees_description: bool = False

    def validate(self) -> None:
        if not self.processor_path:
            raise ConfigError("processor_path: must be set (a local Hugging Face processor directory)")
        if not self.prompts_path:
            raise ConfigError("prompts_path: must be set")
        require_at_least(self, 0, "min_pixels", "max_pixels")
        if self.min_pixels and self.max_pixels and self.max_pixels < self.min_pixels:
            raise ConfigError(f"max_pixels: must be >= min_pixels ({self.min_pixels}), got {self.max_pixels}")
        require_at_least(self, 1, "max_prompt_tokens")
        if not self.contexts:
            raise ConfigError("contexts: at least one context is needed")
        for name in self.contexts:
            if name not in CONTEXT_NAMES:
                raise ConfigError(f"contexts: unknown context {name!r}; known: {', '.join(CONTEXT_NAMES)}")
        if len(set(self.contexts)) != len(self.contexts):
            raise ConfigError(f"contexts: duplicate entries in {list(self.contexts)}")


    def pixel_bounds(self, unit: int) -> tuple[int, int]:
        """``(min_pixels, max_pixels)`` for a model whose image tokens are ``unit x unit`` pixels (its
        family's ``pixel_unit``), a 0 replaced by the default. :class:`ConfigError` naming the option
        for a maximum below one token or below the minimum."""
        token = unit * unit
        lo = self.min_pixels or DEFAULT_MIN_IMAGE_TOKENS * token
        hi = self.max_pixels or DEFAULT_MAX_IMAGE_TOKENS * token
        if hi < token:
            raise ConfigError(f"data.context.max_pixels: {hi} is below one image token of this model "
                              f"({unit} x {unit} = {token} pixels)")
        if hi < lo:
            raise ConfigError(f"data.context.max_pixels: {hi} is below min_pixels {lo} "
                              f"({hi / token:g} < {lo / token:g} image tokens of {unit} x {unit} pixels)")
        return lo, hi


@dataclass
class DataConfig:
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
