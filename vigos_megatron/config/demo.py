"""Configuration of the loss demo (``examples/demo_vigos_loss.py``, ``conf/demo_loss.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vigos_megatron.errors import ConfigError, require_at_least
from vigos_megatron.config.loss import LossConfig


@dataclass
class DemoConfig:
    loss: LossConfig = field(default_factory=LossConfig)
    #: tensor-parallel size; the demo must be launched on exactly this many processes
    tensor_parallel: int = 2
    vocab_size: int = 151936
    rollouts: int = 4
    completion_tokens: int = 48
    #: fraction of rollouts that are malformed (scored by the reference teacher)
    invalid_fraction: float = 0.25
    seed: int = 1234

    def validate(self) -> None:
        require_at_least(self, 1, "tensor_parallel")
        if self.vocab_size % self.tensor_parallel:
            raise ConfigError(f"vocab_size: {self.vocab_size} is not divisible by tensor_parallel={self.tensor_parallel}")
        if self.rollouts < 1 or self.completion_tokens < 4:
            raise ConfigError("rollouts: must be >= 1 and completion_tokens >= 4")
        if not 0.0 <= self.invalid_fraction <= 1.0:
            raise ConfigError(f"invalid_fraction: must be in [0, 1], got {self.invalid_fraction}")
