"""Configuration of rollout sampling (``../shared/METHOD.md`` section 1: temperature 1.1,
top-p 0.95, top-k 20, at most 4096 new tokens).

The method is documented in :mod:`vigos_megatron.rollout.sampling`: temperature, then top-k,
then top-p over the renormalised top-k set, then a Gumbel-max choice whose noise is a
counter-based hash of ``(seed, step, sample_id, position, global vocabulary id)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vigos_megatron.errors import ConfigError, require_at_least, require_positive

#: seeds, steps and sample ids are hashed as unsigned 32-bit words
_U32 = 2**32


@dataclass
class SamplingConfig:
    """How the rollout engine picks each next token."""

    #: logits are divided by it before top-k / top-p / sampling (ignored when ``greedy``)
    temperature: float = 1.1
    #: nucleus mass in (0, 1]; 1 disables top-p
    top_p: float = 0.95
    #: keep the k most probable tokens; 0 disables top-k
    top_k: int = 20
    #: generation stops after this many new tokens (finish reason "length")
    max_new_tokens: int = 4096
    #: argmax decoding (ties broken by the lowest vocabulary id); temperature/top-k/top-p unused
    greedy: bool = False
    #: run seed: the noise is keyed by (seed, step, sample_id, position, global vocabulary id)
    seed: int = 1234
    #: prompts decoded together; more are split into rounds of at most this many
    max_batch_size: int = 32

    def validate(self) -> None:
        require_positive(self, "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: must be >= 0 (0 disables it), got {self.top_k}")
        require_at_least(self, 1, "max_new_tokens")
        if not 0 <= self.seed < _U32:
            raise ConfigError(f"seed: must be in [0, 2**32), got {self.seed}")
        require_at_least(self, 1, "max_batch_size")
