"""vigos-megatron: ViGOS on-policy self-distillation for Qwen2.5-VL on Megatron-Core.

Sub-packages: ``losses`` (vocab-parallel KL, objectives), ``models`` (Qwen2.5-VL student and
frozen teacher on Megatron-Bridge), ``convert`` (HF <-> megatron checkpoints), ``data``
(Vision-SR1-47K WebDataset path, prompt contexts), ``rollout`` (completion parsing, stream
assembly), ``config`` (typed configuration), ``platform`` (CPU / no-TE adaptations).
"""

__version__ = "0.1.0"
