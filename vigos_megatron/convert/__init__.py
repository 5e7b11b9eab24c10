"""HF <-> Megatron checkpoint conversion for Qwen2.5-VL (see :mod:`.converters`, :mod:`.megatron_checkpoint`)."""
