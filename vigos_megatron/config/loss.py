"""Configuration of the training objectives (``../shared/METHOD.md`` sections 2-4)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vigos_megatron.config.loader import ConfigError

OBJECTIVES = ("vigos", "opsd", "vgs")
#: KL implementations (vigos_megatron.losses.vocab_parallel_kl.kl_rows): "auto" = Triton on CUDA, torch otherwise
KL_IMPLS = ("auto", "torch", "triton")


@dataclass
class ViGOSLossConfig:
    """Segment-wise self-distillation: perception, reasoning and reference teachers."""

    lambda_perception: float = 1.0
    lambda_reasoning: float = 1.0
    lambda_reference: float = 2.0
    #: both logits are divided by it; no T^2 factor
    temperature: float = 1.0
    #: hard per-token clamp of the full-vocabulary KL (value clip, gradient 0 above); <= 0 disables
    clip: float = 0.05

    def validate(self) -> None:
        for name in ("lambda_perception", "lambda_reasoning", "lambda_reference"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")


@dataclass
class OPSDLossConfig:
    """Vanilla OPSD: one privileged teacher, forward KL on every completion token."""

    weight: float = 1.0
    temperature: float = 1.0
    clip: float = 0.05

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"weight: must be >= 0, got {self.weight}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")


@dataclass
class VGSLossConfig:
    """Visual Gradient Steering (seed 003): L = eta * (l_std + gamma * l_vis + lambda * l_lp)."""

    eta: float = 0.41
    gamma: float = 2.0
    lambda_lp: float = 0.01
    #: VDS quantile above which the language-preservation term is active (micro-batch tokens)
    lp_quantile: float = 0.7
    #: paper appendix E: gamma_t = 0 below Q_low, gamma/2 between, gamma above Q_high
    adaptive_gamma: bool = False
    adaptive_low_quantile: float = 0.4
    adaptive_high_quantile: float = 0.7
    #: p_S(.|x) inside the visual target q* is a constant (no gradient through the target)
    detach_text_student_in_target: bool = True
    temperature: float = 1.0
    #: off unless configured (<= 0 disables)
    clip: float = 0.0

    def validate(self) -> None:
        for name in ("lp_quantile", "adaptive_low_quantile", "adaptive_high_quantile"):
            q = getattr(self, name)
            if not 0.0 <= q <= 1.0:
                raise ConfigError(f"{name}: must be in [0, 1], got {q}")
        if self.adaptive_low_quantile > self.adaptive_high_quantile:
            raise ConfigError("adaptive_low_quantile: must be <= adaptive_high_quantile")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        for name in ("eta", "gamma", "lambda_lp"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass
class LossConfig:
    objective: str = "vigos"
    vigos: ViGOSLossConfig = field(default_factory=ViGOSLossConfig)
    opsd: OPSDLossConfig = field(default_factory=OPSDLossConfig)
    vgs: VGSLossConfig = field(default_factory=VGSLossConfig)
    #: bytes of one fp32 [chunk, V/tp] work tensor inside the KL (bounds the loss's memory)
    chunk_bytes: int = 64 * 1024 * 1024
    #: KL implementation: "auto" (fused Triton kernels for CUDA tensors, torch otherwise), "torch", "triton"
    impl: str = "auto"

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective: must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.impl not in KL_IMPLS:
            raise ConfigError(f"impl: must be one of {KL_IMPLS}, got {self.impl!r}")
        if self.chunk_bytes < 4096:
            raise ConfigError(f"chunk_bytes: must be >= 4096, got {self.chunk_bytes}")
