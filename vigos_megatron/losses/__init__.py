"""Distillation losses over tensor-parallel vocabulary shards (import the modules):

* :mod:`.vocab_parallel_kl`: ``kl_rows`` / ``vocab_parallel_kl``, dispatching to :mod:`.torch_kl`
  or :mod:`.triton_kl` (shared pieces: :mod:`.kl_common`; implementation names: :mod:`.impls`);
* :mod:`.objectives`: the segmented-distillation and VGS loss functions the objectives
  (:mod:`vigos_megatron.objectives`) build.

Import-light on purpose: the configuration reads :mod:`.impls` without importing torch.
"""
