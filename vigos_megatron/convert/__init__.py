"""HF <-> Megatron checkpoint conversion for Qwen2.5-VL and Qwen3-VL (see :mod:`.converters`, :mod:`.megatron_checkpoint`)."""
