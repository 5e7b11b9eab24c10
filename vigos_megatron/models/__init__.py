"""Qwen2.5-VL under Megatron-Core (megatron-bridge provider/model/mappings) and its frozen teacher.

* :mod:`.qwen2_5_vl`  - :class:`QwenVLBuilder`: HF config/dir -> configured provider -> model chunks
* :mod:`.teacher`     - :func:`build_teacher_replica`: frozen replica sharded like the student
* :mod:`.forward`     - chunk forward and forward-only pipeline schedule (vocab-sharded logits)
* :mod:`.parallel`    - one-process gloo + parallel state for tools
* :mod:`.hf_configs`  - Qwen2.5-VL 3B/7B/32B/72B and Qwen3-VL 2B/4B/8B/32B config values in code (memory
  planning, recipes)
"""
