"""The optimizer's state in a checkpoint: which of megatron's optimizers holds it, its sharded and
common parts, and the conversion between kinds (the distributed optimizer at DP > 1, the fp32 or
mixed-precision one at DP = 1), so a checkpoint resumes at another data-parallel size.

Used by :mod:`vigos_megatron.training.checkpoint`; the key layout is megatron-core's
``sharded_state_dict`` of each optimizer kind.
"""

from __future__ import annotations

import torch

from vigos_megatron.models.hf_checkpoint import CheckpointError

def optimizer_kind(optimizer) -> str:
    """``"fp32"``, ``"mixed_precision"`` or ``"distributed"``: what decides whether stored optimizer state fits."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import FP32Optimizer, MixedPrecisionOptimizer

    kinds = set()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            kinds.add("distributed")
        elif isinstance(opt, MixedPrecisionOptimizer):
            kinds.add("mixed_precision")
        elif isinstance(opt, FP32Optimizer):
            kinds.add("fp32")
        else:
            kinds.add(type(opt).__name__)
    return "+".join(sorted(kinds))


def materialize_optimizer_state(optimizer) -> int:
    """Give every parameter of the (chained) optimizer its Adam state, zeros and step 0, where it has
    none yet (a fresh optimizer, or one whose first steps were all skipped). Returns how many.

    This is exactly the state a fresh Adam starts from, and megatron's checkpoint paths need it:
    its sharded state dict lists only existing state tensors (a save would miss them, a load
    would find nothing to fill), and its distributed optimizer's ``state_dict()`` with torch's
    AdamW (no Apex / Transformer Engine) asserts on an empty state.
    """
    from megatron.core import optimizer as mopt

    added = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        params = [p for g in inner.param_groups for p in g["params"]]
        if all(len(inner.state.get(p, {})) for p in params):
            continue
        if mopt.USING_PYTORCH_OPTIMIZER:
            for p in params:
                if not inner.state.get(p):
                    # torch.optim.AdamW's own initial state (_init_group): step is a float32 scalar tensor
                    inner.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                    added += 1
        else:
            before = sum(1 for p in params if inner.state.get(p))
            opt.init_state_fn(inner, opt.config)
            added += sum(1 for p in params if inner.state.get(p)) - before
    return added


def _is_sharded(v) -> bool:
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    return isinstance(v, ShardedBase)


def _contains_sharded(v) -> bool:
    if _is_sharded(v):
        return True
    if isinstance(v, dict):
        return any(_contains_sharded(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_contains_sharded(x) for x in v)
    return False


def split_sharded(state: dict) -> tuple[dict, dict]:
    """``state`` -> ``(sharded, common)``: the sharded leaves (tensors, factories, objects) and
    everything else, both keeping the dict nesting. A list holding a sharded leaf goes whole to
    ``sharded`` (it must hold nothing else); :func:`merge_split` inverts it."""
    sharded, common = {}, {}
    for k, v in state.items():
        if isinstance(v, dict):
            s, c = split_sharded(v)
            if s:
                sharded[k] = s
            if c or not s:
                common[k] = c
        elif _contains_sharded(v):
            if isinstance(v, (list, tuple)) and not all(_is_sharded(x) or _contains_sharded(x) for x in v):
                raise CheckpointError(f"optimizer state entry {k!r} mixes sharded and plain values in a list")
            sharded[k] = v
        else:
            common[k] = v
    return sharded, common


def merge_split(sharded: dict, common: dict) -> dict:
    """Inverse of :func:`split_sharded` (on loaded values)."""
    out = dict(common)
    for k, v in sharded.items():
        if k in out and isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = merge_split(v, out[k])
        else:
            out[k] = v
    return out


#: (saved kind, current kind) pairs whose tensors map onto each other (same parameter dtype)
CONVERTIBLE = {("distributed", "fp32"), ("fp32", "distributed"),
                ("distributed", "mixed_precision"), ("mixed_precision", "distributed")}
#: the name of the fp32 main weights in each kind's sharded keys (fp32: the model weights themselves)
_MAIN_PARAM = {"distributed": "param", "mixed_precision": "fp32_param", "fp32": None}
_STATE_PREFIX = "optimizer.state."


def _sharded_leaves(d, path=()):
    """``(path, leaf)`` for the ShardedTensor / factory leaves of a nested dict (lists: by index)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, (list, tuple)) else ()
    for k, v in items:
        if isinstance(v, (ShardedTensor, ShardedTensorFactory)):
            yield path + (k,), v
        else:
            yield from _sharded_leaves(v, path + (k,))


def retarget_main_params(opt_sharded: dict, saved_kind: str, kind: str) -> dict:
    """Point this optimizer's request at another optimizer kind's stored tensors (in place).

    Adam moments share their keys across kinds. The fp32 main weights are stored as
    ``optimizer.state.param.<key>`` (distributed) or ``optimizer.state.fp32_param.<key>`` (mixed
    precision): renamed. The ``fp32`` optimizer stores none: its main weights ARE the model
    weights, stored as ``<key>`` (same global shape and offsets). Those requests are taken out
    and returned as ``{path: request pointed at <key>}``: the "model" request reads the same
    shards, and one load may not read a shard twice, so they are loaded by a second load.
    """
    mine, theirs = _MAIN_PARAM[kind], _MAIN_PARAM[saved_kind]
    separate = {}
    if mine is None:
        return separate
    prefix = f"{_STATE_PREFIX}{mine}."
    for path, leaf in list(_sharded_leaves(opt_sharded)):
        if leaf.key.startswith(prefix):
            model_key = leaf.key[len(prefix):]
            if theirs is None:
                leaf.key = model_key
                parent = opt_sharded
                for k in path[:-1]:
                    parent = parent[k]
                separate[path] = parent.pop(path[-1])
            else:
                leaf.key = f"{_STATE_PREFIX}{theirs}.{model_key}"
    return separate


def unwrap_local(x):
    """A request's non-sharded part with megatron's LocalNonpersistentObject wrappers removed."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    if isinstance(x, LocalNonpersistentObject):
        return x.unwrap()
    if isinstance(x, dict):
        return {k: unwrap_local(v) for k, v in x.items()}
    if isinstance(x, list):
        return [unwrap_local(v) for v in x]
    return x


def adam_step(common: dict) -> float:
    """The Adam step count stored in an optimizer's common state (any kind)."""
    found = []

    def walk(x, key=None):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, k)
        elif isinstance(x, list):
            for v in x:
                walk(v, key)
        elif key in ("step", "common_step") and x is not None:
            found.append(float(x))

    walk(common)
    if not found:
        return 0.0  # a checkpoint of an optimizer that never stepped
    if len(set(found)) != 1:
        raise CheckpointError(f"optimizer state holds different Adam step counts {sorted(set(found))}")
    return found[0]


def set_adam_step(common: dict, kind: str, step: float) -> None:
    if kind == "distributed":
        for group in common["optimizer"]["param_groups"]:
            group["step"] = step
    elif kind == "fp32":
        common.setdefault("state", {})["common_step"] = torch.tensor(step, dtype=torch.float32)
    elif kind == "mixed_precision":
        common["optimizer"].setdefault("state", {})["common_step"] = torch.tensor(step, dtype=torch.float32)
    else:
        raise CheckpointError(f"cannot set the Adam step of a {kind!r} optimizer")
