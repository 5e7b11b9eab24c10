"""Platform support: the ONLY place where this project patches other libraries.

Two independent adaptations, each applied only where it is needed:

1. **CPU mode** (no CUDA device present, or ``VIGOS_FORCE_CPU=1``: see :mod:`vigos_megatron.runtime`). megatron-core 0.19 assumes CUDA at a
   few points even when its collectives run on gloo (``../shared/ENVIRONMENT.md``):

   * ``torch.cuda.current_device()`` used as a device  -> returns ``cpu``;
   * the CUDA RNG tracker (local attention always forks it) -> forks the CPU RNG
     (``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` read / write the CPU state);
   * ``device="cuda"`` literals (pipeline schedules' token counter, optimizer,
     grad clipping) -> allocated on the CPU;
   * ``torch.cuda.synchronize()`` in p2p communication and in dist_checkpointing's
     writer, ``torch.cuda.current_stream()`` in the DDP grad buffer -> no-ops;
   * ``weight.data.cuda()`` in ``LanguageModule.setup_embeddings_and_output_layer`` (tied
     embeddings at PP>1) -> the CPU tensor, only while that method runs;
   * the ``param.grad.type() == 'torch.cuda.FloatTensor'`` assertion in grad clipping
     -> ``clip_grad_by_total_norm_fp32`` replaced by the same math without it.

   The literals are redirected by giving the affected megatron modules a
   ``torch`` attribute that forwards everything to the real ``torch`` except
   tensor factories (``device="cuda"`` -> CPU) and ``torch.cuda`` (a few CPU
   equivalents). No global torch function changes except ``torch.cuda.current_device``.
   * the distributed optimizer's and the bf16/fp16 optimizer's ``param.type()`` checks
     (``'torch.cuda.FloatTensor'`` ...) -> CPU tensors answer their CUDA type string, only
     while those optimizers' constructors run.
   Not covered (raise as before): autocast, sequence and context parallelism.

2. **No Transformer Engine** (any machine without TE, GPU ones included).
   megatron-bridge imports ``transformer_engine.pytorch`` at import time (its LoRA
   layers). A stand-in package is registered in ``sys.modules`` AFTER megatron-core
   and its GPT model have been imported, so megatron-core's own TE detection has
   already concluded that TE is absent. The stand-in answers lower-case attributes
   with sub-modules and capitalised ones with classes that refuse instantiation,
   so nothing can silently run a fake TE kernel.

3. **Torch Adam in the distributed optimizer** (neither Apex nor TE: megatron-core falls back to
   ``torch.optim.AdamW``, whose per-parameter state holds a ``step`` tensor). Two defects of
   ``DistributedOptimizer`` on that path, fixed around the same methods:

   * ``load_state_dict`` gives every parameter the SAME ``step`` tensor object; AdamW then
     increments it in place once per parameter per step (after one step on 47 parameters the
     step reads 49 instead of 3, and the bias correction is wrong): each parameter gets its own
     copy after the load;
   * loading the layout-independent checkpoint format (``fully_reshardable``) copies every
     tensor of a parameter's state from the loaded ones and fails with ``KeyError: 'step'``
     (the step is restored separately, from the parameter groups): the step entry is marked as
     not loaded (``None``: skipped by megatron's own check).

Call :func:`activate` once per process before building megatron models or
importing megatron-bridge. It is idempotent and returns what it applied.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import sys
import types
from dataclasses import dataclass

import torch

_STATE: dict[str, bool] = {}

#: megatron-core modules whose ``torch`` global is replaced in CPU mode
_CPU_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.random",
    # get_default_causal_mask / sliding-window mask: torch.ones(..., device="cuda") (local attention, mask=None)
    "megatron.core.transformer.utils",
    # dist_checkpointing save path: torch.cuda.synchronize() before writing, device="cuda" result flags
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    # local_multi_tensor_l2_norm (grad norm without apex/TE): torch.tensor(..., device="cuda")
    "megatron.core.utils",
)

_TE_SUBMODULES = (
    "pytorch",
    "common",
    "common.recipe",
    "pytorch.module",
    "pytorch.module.base",
    "pytorch.fp8",
    "pytorch.tensor",
    "pytorch.distributed",
    "pytorch.cpp_extensions",
    "pytorch.float8_tensor",
)


@dataclass(frozen=True)
class PlatformStatus:
    cpu_mode: bool
    te_standin: bool


def needs_cpu_mode() -> bool:
    """No CUDA device, or the CPU forced with ``VIGOS_FORCE_CPU=1`` (:mod:`vigos_megatron.runtime`)."""
    from vigos_megatron import runtime

    return not runtime.use_cuda()


def needs_te_standin() -> bool:
    mod = sys.modules.get("transformer_engine")
    if mod is not None:
        return False
    return importlib.util.find_spec("transformer_engine") is None


def activate() -> PlatformStatus:
    """Apply the adaptations this machine needs (idempotent)."""
    if needs_cpu_mode() and not _STATE.get("cpu"):
        _apply_cpu_mode()
        _STATE["cpu"] = True
    if not _STATE.get("te") and needs_te_standin():
        _install_te_standin()
        _STATE["te"] = True
    if not _STATE.get("torch_adam") and needs_torch_adam_fix():
        _patch_distopt_torch_adam_step()
        _STATE["torch_adam"] = True
    return status()


def needs_torch_adam_fix() -> bool:
    """megatron-core's distributed optimizer runs on torch's AdamW (no Apex, no real TE)."""
    te = sys.modules.get("transformer_engine")
    real_te = (te is not None and not is_te_standin(te)) or (te is None and importlib.util.find_spec("transformer_engine"))
    if real_te or importlib.util.find_spec("apex") is not None:
        return False
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _patch_distopt_torch_adam_step() -> None:
    """See the module docstring, item 3."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.__dict__["_set_main_param_and_optimizer_states"]
    if getattr(original, "__vigos_torch_adam__", False):
        return

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors:
            tensors = {**tensors, "step": None}
        return original(self, model_param, tensors)

    _set_main_param_and_optimizer_states.__vigos_torch_adam__ = True
    _set_main_param_and_optimizer_states.__doc__ = original.__doc__
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states

    original_load = DistributedOptimizer.__dict__["load_state_dict"]

    def load_state_dict(self, state_dict):
        out = original_load(self, state_dict)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.clone()  # one step counter per parameter, as torch's AdamW keeps them
        return out

    load_state_dict.__doc__ = original_load.__doc__
    DistributedOptimizer.load_state_dict = load_state_dict


def status() -> PlatformStatus:
    return PlatformStatus(cpu_mode=bool(_STATE.get("cpu")), te_standin=bool(_STATE.get("te")))


# --------------------------------------------------------------------------- CPU mode


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _NullStream:
    def wait_event(self, *_a, **_k):
        return None

    def wait_stream(self, *_a, **_k):
        return None

    def synchronize(self):
        return None


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as seen by patched megatron modules on a CPU-only machine."""

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def synchronize(*_a, **_k):
        return None

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def current_stream(*_a, **_k):
        return _NullStream()

    @staticmethod
    def stream(*_a, **_k):
        return contextlib.nullcontext()

    @staticmethod
    def get_rng_state(*_a, **_k):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *_a, **_k):
        torch.set_rng_state(state)


def _factory(fn):
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapped.__name__ = fn.__name__
    return wrapped


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by patched megatron modules: factories never allocate on CUDA."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like", "ones_like")

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in self._FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip, same math, without its CUDA type-string assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for p in parameters:
        g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
        if g is not None:
            grads.append(g.detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
        for g in grads:
            g.mul_(clip_coeff.to(g.device))
    elif clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    """Within this block only, ``tensor.cuda()`` returns the tensor itself (CPU-only machine)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _patch_tied_embedding_sync() -> None:
    """Tied embeddings at PP>1: ``LanguageModule.setup_embeddings_and_output_layer`` moves the
    shared weight with ``weight.data.cuda()`` before all-reducing it over the embedding group;
    on CPU the all-reduce runs on the CPU tensor (gloo). Same method, ``.cuda()`` neutral inside it."""
    from megatron.core.models.common.language_module import language_module as lm

    original = lm.LanguageModule.setup_embeddings_and_output_layer
    if getattr(original, "__vigos_cpu__", False):
        return

    def setup_embeddings_and_output_layer(self, *a, **k):
        with _tensor_cuda_is_identity():
            return original(self, *a, **k)

    setup_embeddings_and_output_layer.__vigos_cpu__ = True
    setup_embeddings_and_output_layer.__doc__ = original.__doc__
    lm.LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


@contextlib.contextmanager
def _tensor_type_reports_cuda():
    """Within this block only, ``tensor.type()`` (no argument) of a CPU tensor answers the CUDA type
    string (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``), as megatron's type checks expect."""
    original = torch.Tensor.type

    def type_(self, *a, **k):
        out = original(self, *a, **k)
        if not a and not k and isinstance(out, str) and out.startswith("torch.") and not out.startswith("torch.cuda."):
            return "torch.cuda." + out[len("torch."):]
        return out

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _patch_optimizer_type_checks() -> None:
    """The distributed optimizer and the fp16/bf16 optimizer sort the model's parameters by
    ``param.type()`` strings (``'torch.cuda.FloatTensor'``, ...) while building their groups and
    raise on anything else. Same constructors, CPU tensors reported with their CUDA type string
    only while they run (the groups they build hold the real CPU tensors)."""
    from megatron.core.optimizer import distrib_optimizer, optimizer

    targets = [(optimizer.Float16OptimizerWithFloat16Params, "__init__"),
               (distrib_optimizer.DistributedOptimizer, "__init__")]
    for cls, name in targets:
        original = cls.__dict__[name]
        if getattr(original, "__vigos_cpu__", False):
            continue

        def make(fn):
            def wrapped(self, *a, **k):
                with _tensor_type_reports_cuda():
                    return fn(self, *a, **k)

            wrapped.__vigos_cpu__ = True
            wrapped.__doc__ = fn.__doc__
            return wrapped

        setattr(cls, name, make(original))


def _apply_cpu_mode() -> None:
    import importlib

    torch.cuda.current_device = _CpuCuda.current_device  # ~200 call sites use it as a device
    fake = _CpuTorch()
    for name in _CPU_MODULES:
        mod = importlib.import_module(name)
        mod.torch = fake
    random_mod = sys.modules["megatron.core.tensor_parallel.random"]
    random_mod._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    # fork() reads the state through _get_cuda_rng_state (torch.cuda.random.get_rng_state) directly
    random_mod._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    _patch_tied_embedding_sync()
    _patch_optimizer_type_checks()
    for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        mod = sys.modules[name]
        if hasattr(mod, "clip_grad_by_total_norm_fp32"):
            mod.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32


# --------------------------------------------------------------------------- TE stand-in


class _RefusingMeta(type):
    pass


def _refusing_class(qualname: str):
    def _init(self, *a, **k):
        raise RuntimeError(
            f"{qualname} is a stand-in: Transformer Engine is not installed on this machine. "
            "Use the local layer spec (vigos_megatron model config: transformer_impl='local')."
        )

    return _RefusingMeta(qualname.rsplit(".", 1)[-1], (), {"__init__": _init, "__module__": qualname.rsplit(".", 1)[0]})


class _TEStandin(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        if name[:1].isupper():
            value = _refusing_class(full)
        else:
            value = _make_te_module(full)
            sys.modules[full] = value
        setattr(self, name, value)
        return value


def _make_te_module(fullname: str) -> types.ModuleType:
    mod = _TEStandin(fullname)
    mod.__spec__ = importlib.machinery.ModuleSpec(fullname, loader=None, is_package=True)
    mod.__path__ = []
    mod.__version__ = "0.0.0+vigos-standin"
    mod.__vigos_standin__ = True
    return mod


def _install_te_standin() -> None:
    # megatron-core must conclude "no TE" before the stand-in exists.
    import megatron.core  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401

    root = _make_te_module("transformer_engine")
    sys.modules["transformer_engine"] = root
    for sub in _TE_SUBMODULES:
        parent = root
        parts = sub.split(".")
        for i, part in enumerate(parts):
            full = "transformer_engine." + ".".join(parts[: i + 1])
            child = sys.modules.get(full)
            if child is None:
                child = _make_te_module(full)
                sys.modules[full] = child
            setattr(parent, part, child)
            parent = child


def is_te_standin(module) -> bool:
    return bool(getattr(module, "__vigos_standin__", False))
