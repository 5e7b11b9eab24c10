"""The ViGOS training loop (``examples/pretrain_vigos.py``). Import-light: import the modules.

* :mod:`~vigos_megatron.training.setup`: the student stage, its frozen teacher, megatron DDP;
* :mod:`~vigos_megatron.training.rollouts`: the student's on-policy rollouts, parsed and graded;
* :mod:`~vigos_megatron.training.scoring`: teacher contexts, stream micro-batches, the objective;
* :mod:`~vigos_megatron.training.update`: one schedule call (student + teacher), the optimizer step;
* :mod:`~vigos_megatron.training.loop`: the iteration, top to bottom;
* :mod:`~vigos_megatron.training.optimizer`: megatron Adam (distributed when DP > 1), LR schedule,
  the DDP configuration, forcing the parameter gather before generation;
* :mod:`~vigos_megatron.training.checkpoint`: training checkpoints (dist_checkpointing: student,
  optimizer, scheduler, RNG, loader position), exact resume, other layouts, verified saves;
* :mod:`~vigos_megatron.training.checkpoint_resume`: which checkpoint a launch resumes from
  (checked first; ``checkpoint.on_corrupt``);
* :mod:`~vigos_megatron.training.checkpoint_files`: a run directory's checkpoints as files (complete,
  incomplete, moved aside, ``keep_last``) and the settings stored with them (no torch);
* :mod:`~vigos_megatron.training.metrics`: ``metrics.jsonl`` / TensorBoard, the progress line;
* :mod:`~vigos_megatron.training.signals`: stop after the current step on SIGTERM / SIGINT (repeats
  within 2 s are one stop), the exit codes;
* :mod:`~vigos_megatron.training.launch`: the documented launch (torchrun as its child, exit codes);
* :mod:`~vigos_megatron.training.console`: what a person sees on the console;
* :mod:`~vigos_megatron.training.tiny_demo`: the embedded tiny CPU run's model and data.
"""
