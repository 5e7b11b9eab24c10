"""Vision-SR1-47K data pipeline: parquet -> WebDataset shards -> streaming loader -> ViGOS contexts.

* :mod:`.answers`            problem clean-up (``<image>``) and answer normalisation
* :mod:`.schema`             one parquet row -> validated record, or a skip reason
* :mod:`.webdataset_writer`  deterministic shard writer + manifest/index (``tools/make_webdataset.py``)
* :mod:`.sample_order`       the global, per-epoch shuffled sample stream (seeded, resumable)
* :mod:`.loader`             rank/worker split, batches, ``state_dict`` resume (energon decision inside)
* :mod:`.images`             qwen-vl-utils sizing + image processor -> ``pixel_values``, ``image_grid_thw``
* :mod:`.prompts`            prompt templates from ``conf/prompts/*.yaml``
* :mod:`.contexts`           token-id prefixes of the student/teacher/VGS contexts
* :mod:`.synthetic`          real-schema parquet files for tests and benchmarks
"""
