"""Per-GPU memory estimate of a ViGOS run of Qwen2.5-VL or Qwen3-VL on Megatron-Core (TP x PP x DP).

:func:`estimate_memory` answers "does this layout fit?" for any Qwen2.5-VL / Qwen3-VL shape, parallel
layout and workload; :func:`estimate_for_config` does it for a training config;
:func:`choose_layout` / :func:`smallest_world_size` search layouts (the recipes use them).
Everything is counted in bytes on one GPU of the worst pipeline stage. A step has two phases
that never overlap, so ``peak = static + max(train phase, rollout phase)``.

**Static** (held for the whole run), with ``n`` = the student parameters on this rank (its
``1/tp`` shard of its ``L/pp`` language layers, the embedding on the first stage, the final
norm and output layer on the last, the tied output layer copy on the last stage when PP > 1,
and the vision tower on the first stage: Qwen2.5-VL's whole HF tower on every TP rank (replicated),
Qwen3-VL's Megatron ViT and its deepstack mergers split over TP except norms, row-parallel biases
and the patch/position embeddings)
and ``t`` the trainable part of ``n`` (the vision tower is left out when it is frozen):

* student parameters ``2 n`` (bf16);
* gradient buffer ``4 t`` (megatron DDP with ``grad_reduce_in_fp32``) or ``2 t``;
* optimizer states ``12 t / dp`` with the distributed optimizer (fp32 main weights + Adam's two
  moments, sharded over data parallelism; ``12 t`` without it or at DP = 1);
* teacher parameters ``2 n`` (bf16 replica of the same shards; no gradients, no optimizer state),
  or, for a teacher of its own (``teacher=``, another width and depth), ``2 n_t`` with ``n_t`` its
  parameters on this rank: its ``1/tp`` shard of the layers this stage holds
  (:func:`vigos_megatron.config.teacher.stage_layers`), its embedding, output layer and vision tower
  as for the student. Where the teacher differs, every teacher term below takes the teacher's
  sizes (``H_t``, its heads and vision tower).

**Training phase** (scoring + update of one micro-batch stream; ``B`` rollouts per micro-batch,
``Ks`` student rows and ``Kt`` teacher rows per rollout, all padded to ``S = prompt +
completion`` rounded up to ``seq_multiple``; ``Ks, Kt`` = 1, 2 for ViGOS, 1, 1 for OPSD, 2, 2 for
VGS). Stage ``s`` keeps the activations of ``min(pp - s, micro-batches)`` micro-batches in flight
(1F1B):

* student language activations, per layer and student token, from what autograd saves (bf16
  activations, no sequence parallelism; ``H`` hidden, ``F`` FFN, ``a``/``g`` query/KV heads, ``d``
  head dim)::

      sdpa / local (torch RMSNorm)   2 (10H + 4) + 8d + [2ad + 2gd + 2(a + 2g)d + 4a + 2ad + 10F] / tp
        (sdpa on Qwen2.5-VL: fp32 rope, 16d for 8d; selective: fp32 q/k, + [2ad + 2gd] / tp)
      local (unfused attention)      2 (10H + 4) + 8d + [8ad + 10F] / tp + per row (2 a / tp) S^2 + S^2 (mask)
      transformer_engine             2 (4H + 4)  + 8d + [2ad + 2gd + 2(a + 2g)d + 4a + 2ad + 6F] / tp

  (``selective`` recomputation drops the softmax statistics ``4a/tp``, and the ``S^2`` terms of
  the unfused attention, keeping a 4-byte RNG state per layer); with ``full`` recomputation only
  each layer's input ``2H`` per token stays (plus the fp32 rotary table ``4d`` per token), and
  backward re-runs one layer at a time (a transient). Stages > 0 do not count their first
  layer's input (it is the received stream tensor); the first stage adds the int64 ids (and a
  bool mask at TP > 1), the last the final norm and the output layer's input. Qwen3-VL's QK-norm
  adds ``[8ad + 8gd + 4a + 4g] / tp`` (fp32 input and output per head, fp32 statistics), and its
  local path (Bridge's ``Qwen3VLSelfAttention`` attends in fp32 outside the core-attention module,
  so ``selective`` recomputes nothing there) ``4ad / tp`` per token and ``(6 a / tp) S^2`` per row
  instead of ``(2 a / tp) S^2``. The
  ``local`` and ``sdpa`` coefficients are checked exactly against the tensors
  autograd saves in the tiny model (tests/test_recipes.py); ``transformer_engine`` follows what
  TE's fused norm+linear, fused attention and SwiGLU save (not measured here: no TE on CPU).
* teacher rows: run under ``no_grad``, so they keep nothing; only a transient working set of
  one layer (bounded by the sum of that layer's outputs).
* student vision tower (first stage): Qwen2.5-VL, per patch, ``2 * 1176`` (pixels) ``+ 12 h_v + 8``
  (merger, window index) ``+ depth * (30 h_v + 8 + 8 d_v + 4 a_v + 8 I_v)`` (HF blocks with SDPA), or
  ``depth * 2 h_v`` for the blocks when they are checkpointed (``vision_recompute``: HF gradient
  checkpointing of the vision blocks); checked exactly on the tiny model too. Qwen3-VL: pixels,
  merger and deepstack mergers, and each Megatron ViT block's input ``2 h_v`` under full
  recomputation (the ViT takes the language model's recompute settings), see
  :meth:`~vigos_megatron.recipes.shapes.Qwen3VisionShape.stored_bytes_per_patch`; checked exactly
  on two tiny shapes at TP 1. An image of ``T`` LM tokens has ``4 T`` patches.
* Qwen3-VL deepstack features (first stage): ``len(deepstack_visual_indexes)`` bf16 ``[T, H]``
  tensors per student image row, kept as inputs of the first layers' recomputation.
* received pipeline tensors ``2 S (R_s H + R_t H_t)`` per micro-batch in flight on stages > 0 (the whole stream,
  teacher rows included, counted at the full prompt length: an upper bound, since each slot
  travels at its own length); sent outputs are deallocated (``deallocate_pipeline_outputs``).
* the loss (last stage) reads ``C`` student and ``C`` teacher rows per rollout for ViGOS/OPSD
  (twice that for VGS) and, in both paths, returns the output weight's gradient ``2 V/tp H``
  (bf16, until DDP adds it to the gradient buffer). From hidden states (``loss.from_hidden``, the
  default): the rows' final hidden states ``2 H`` each, the student rows' hidden gradient (fp32
  in the KL, then bf16: ``6 H``), and the KL's fp32 work tensors (12 x ``loss.chunk_bytes``: the
  student's and the teacher's weight blocks, the tiles of both sides and their reductions, the
  token chunk's combined rows, the block's weight-gradient accumulator; measured at the 3B shape
  with fp32 logits, ``benchmarks/bench_kl.py --from-hidden --malloc mmap``: 11.5) whatever the
  number of rows. From logits: ``[rows, V/tp]`` kept for the KL's backward, the student
  logits' gradient, and the KL's fp32 chunk temporaries (4 x ``loss.chunk_bytes``);
  ``loss.logits_dtype`` sets their price: ``float32`` (the default; the output layer's fp32
  accumulator, :mod:`vigos_megatron.models.output_logits`) keeps ``4 (C_s + C_t)`` bytes per
  vocabulary entry plus the student's gradient ``4 C_s`` and its bf16 copy for the output layer's
  backward ``2 C_s``; ``model`` (rounded to bf16) keeps ``2 (C_s + C_t) + 2 C_s``: fp32 costs
  ``2 C_t + 6 C_s`` bytes per entry more (the 7B recipe, TP=4, one rollout of 4,096 completion
  tokens per micro-batch, ViGOS: 2.03 GiB against 0.87 GiB), and the loss's traffic over the
  logits doubles (the GEMM that forms them is the same: bf16 operands, fp32 accumulation, only
  the final rounding skipped). The path from hidden states forms each chunk's logits in fp32
  at no extra memory.

**Rollout phase** (generation of a round of ``b = min(prompts per DP rank, max_batch_size)``
prompts by :class:`~vigos_megatron.rollout.engine.MegatronRolloutEngine`):

* KV cache ``b * (prompt + completion) * (L / pp) * 2 * (g / tp) * d * 2`` bytes (bf16 keys and
  values of this stage's layers, the KV heads split over TP);
* the round's input embeddings ``2 b P H`` and image embeddings ``2 b T H`` (first stage; times
  ``1 + len(deepstack_visual_indexes)`` for Qwen3-VL's deepstack features);
* the transient of the largest of: one prefill row group (``prefill_max_tokens`` tokens) through
  one layer (with the engine's local attention: ``4 (a/tp) P^2`` bytes of scores and
  probabilities per prompt row), or the vision tower over all the round's images at once
  (the engine encodes a round's images in one call).

Not counted (the reserve covers them): the CUDA context, NCCL buffers, allocator fragmentation,
megatron's small buffers. ``reserve_gib`` (default 5 GiB) is kept free of the card's usable memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vigos_megatron import objectives
from vigos_megatron.losses.impls import DEFAULT_CHUNK_BYTES
from vigos_megatron.recipes.shapes import (  # noqa: F401  (ModelShape, LayoutError: part of this module's API)
    LAYER_SPECS,
    RECOMPUTE,
    LayoutError,
    ModelShape,
    _check_choice,
    as_model_shape,
)

GIB = 1024**3
MIB = 1024**2
#: usable memory of an "80 GB" A100/H100 as torch reports it (GiB), and what to keep free
GPU_80GB_GIB = 79.0
DEFAULT_RESERVE_GIB = 5.0


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """What a step does, independent of the layout (defaults: the model card's ViGOS recipe)."""

    #: longest prompt (student or teacher context) and completion, in tokens
    prompt_tokens: int = 32768
    completion_tokens: int = 4096
    #: LM tokens of the largest image (qwen-vl-utils' default max_pixels: 16384)
    image_tokens: int = 16384
    #: prompts per optimizer step over all DP ranks, and rollouts per micro-batch
    global_batch_size: int = 32
    micro_batch_size: int = 1
    #: prompts generated together (``sampling.max_batch_size``)
    rollout_batch_size: int = 32
    #: the rollout engine prefills row groups of at most this many tokens
    prefill_max_tokens: int = 32768
    seq_multiple: int = 64
    objective: str = "vigos"
    recompute: str = "full"
    #: checkpoint the HF vision blocks of the student (HF gradient checkpointing)
    vision_recompute: bool = True
    freeze_vision: bool = False
    #: layer spec of the training forward, and the attention the rollout engine uses
    layer_spec: str = "sdpa"
    rollout_layer_spec: str = "local"
    grad_reduce_in_fp32: bool = True
    distributed_optimizer: bool = True
    #: logits only at the positions the loss reads (else every position of every row)
    logits_at_loss_positions_only: bool = True
    #: the KL from the final hidden states and output weights (no logits kept; ``loss.from_hidden``)
    loss_from_hidden: bool = True
    loss_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    #: ``loss.logits_dtype``: the logits the loss reads, "float32" (unrounded) or "model" (bf16)
    logits_dtype: str = "float32"

    def validate(self) -> None:
        for name in ("prompt_tokens", "completion_tokens", "global_batch_size", "micro_batch_size",
                     "rollout_batch_size", "prefill_max_tokens", "seq_multiple", "loss_chunk_bytes"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.image_tokens < 0:
            raise LayoutError(f"image_tokens: must be >= 0, got {self.image_tokens}")
        _check_choice("objective", self.objective, objectives.MODULES)
        _check_choice("recompute", self.recompute, RECOMPUTE)
        _check_choice("layer_spec", self.layer_spec, LAYER_SPECS)
        _check_choice("rollout_layer_spec", self.rollout_layer_spec, LAYER_SPECS)
        _check_choice("logits_dtype", self.logits_dtype, ("float32", "model"))

    @property
    def seq_length(self) -> int:
        s = self.prompt_tokens + self.completion_tokens
        return -(-s // self.seq_multiple) * self.seq_multiple

    @classmethod
    def from_config(cls, cfg, model, **overrides) -> "Workload":
        """The workload of a :class:`~vigos_megatron.config.train.PretrainConfig` (GPU planning) for
        ``model`` (anything :meth:`ModelShape.from_hf` reads): its largest image has
        ``data.context.max_pixels`` over the square of the vision tower's pixel unit (28 for
        Qwen2.5-VL, 32 for Qwen3-VL) LM tokens.

        ``model.transformer_impl`` "auto" is planned as "sdpa" (the layer spec without Transformer
        Engine, which keeps more than TE's); the rollout engine runs megatron's local attention.
        The student's vision blocks are assumed checkpointed when ``model.recompute`` is "full".
        """
        impl = cfg.model.transformer_impl
        spec = "sdpa" if impl == "auto" else impl
        unit = as_model_shape(model).vision.pixel_unit
        ctx = cfg.data.context
        values = dict(
            prompt_tokens=ctx.max_prompt_tokens,
            completion_tokens=cfg.sampling.max_new_tokens,
            image_tokens=min(ctx.pixel_bounds(unit)[1] // unit**2, ctx.max_prompt_tokens),
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size,
            rollout_batch_size=cfg.sampling.max_batch_size,
            seq_multiple=cfg.train.seq_multiple,
            objective=cfg.loss.objective,
            recompute=cfg.model.recompute,
            vision_recompute=cfg.model.recompute == "full",
            freeze_vision=cfg.model.freeze_vision,
            layer_spec=spec,
            distributed_optimizer=cfg.optimizer.distributed_optimizer,
            loss_chunk_bytes=cfg.loss.chunk_bytes,
            loss_from_hidden=cfg.loss.from_hidden,
            logits_dtype=cfg.loss.logits_dtype,
        )
        values.update(overrides)
        return cls(**values)


# --------------------------------------------------------------------------- estimate


def logits_bytes(n_student: int, n_teacher: int, v_local: int, logits_dtype: str) -> dict:
    """The last stage's logits at the loss positions and the student's logits gradient (module docstring)."""
    if logits_dtype == "float32":
        return {"logits at the loss positions (fp32) + student grad (fp32, bf16 copy)":
                (4 * (n_student + n_teacher) + 6 * n_student) * v_local}
    return {"logits at the loss positions (bf16) + student grad": (2 * (n_student + n_teacher) + 2 * n_student) * v_local}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the worst pipeline stage (``stage``) of a ``tp x pp x dp`` layout."""

    tp: int
    pp: int
    dp: int
    stage: int
    static: dict
    train: dict
    rollout: dict
    #: peak bytes of every pipeline stage
    stage_peaks: tuple
    #: student parameters on one rank of ``stage`` (language, vision)
    rank_params: tuple
    #: unique parameters of the model (sum over one rank of every stage, un-sharded)
    model_params: int
    workload: Workload = field(default_factory=Workload)

    @property
    def static_bytes(self) -> int:
        return sum(self.static.values())

    @property
    def train_bytes(self) -> int:
        return sum(self.train.values())

    @property
    def rollout_bytes(self) -> int:
        return sum(self.rollout.values())

    @property
    def peak_bytes(self) -> int:
        return self.static_bytes + max(self.train_bytes, self.rollout_bytes)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def fits(self, gpu_memory_gib: float = GPU_80GB_GIB, reserve_gib: float = DEFAULT_RESERVE_GIB) -> bool:
        return self.peak_bytes <= (gpu_memory_gib - reserve_gib) * GIB

    def table(self) -> str:
        """A readable breakdown (GiB)."""
        w = self.workload
        lines = [
            f"layout tp={self.tp} pp={self.pp} dp={self.dp} (world {self.tp * self.pp * self.dp}); "
            f"worst stage {self.stage} of {self.pp}",
            f"workload: {w.objective}, prompt {w.prompt_tokens} + completion {w.completion_tokens} tokens "
            f"(S={w.seq_length}), image {w.image_tokens} tokens, {w.micro_batch_size} rollout(s)/micro-batch, "
            f"recompute={w.recompute}, vision_recompute={w.vision_recompute}, spec={w.layer_spec}, "
            f"rollout batch {min(w.rollout_batch_size, w.global_batch_size // self.dp)}",
            f"student params on this rank: {self.rank_params[0]:,} language + {self.rank_params[1]:,} vision",
        ]
        for title, part in (("static", self.static), ("training phase", self.train), ("rollout phase", self.rollout)):
            lines.append(f"  {title}: {sum(part.values()) / GIB:8.2f} GiB")
            lines += [f"    {k:<52} {v / GIB:8.2f}" for k, v in part.items()]
        lines.append(f"  peak = static + max(training, rollout): {self.peak_gib:.2f} GiB "
                     f"(stages: {', '.join(f'{p / GIB:.1f}' for p in self.stage_peaks)})")
        return "\n".join(lines)


def loss_bytes(w: Workload, h: int, v_local: int, rows_s: int, rows_t: int, h_t: int | None = None) -> dict[str, int]:
    """The last stage's loss terms (module doc): ``rows_s`` student and ``rows_t`` teacher rows scored
    (the teacher's hidden size ``h_t``, default ``h``)."""
    weight_grad = {"output-weight gradient (bf16)": 2 * v_local * h}
    h_t = h if h_t is None else h_t
    if w.loss_from_hidden and w.logits_at_loss_positions_only:
        return {"hidden states at the loss positions (bf16) + student grad": (rows_s * h + rows_t * h_t) * 2
                + rows_s * h * 6,
                **weight_grad,
                "KL tiles from hidden states (fp32)": min(12 * w.loss_chunk_bytes, 12 * 4 * v_local * (rows_s + rows_t))}
    return {**logits_bytes(rows_s, rows_t, v_local, w.logits_dtype),
            **weight_grad,
            "KL chunk temporaries (fp32)": min(4 * w.loss_chunk_bytes, 4 * 4 * v_local * (rows_s + rows_t))}


def teacher_layers(m: ModelShape, t: ModelShape, tp: int, pp: int) -> list[int]:
    """The teacher ``t``'s layers per stage beside the student ``m`` (:func:`~vigos_megatron.config.teacher.stage_layers`),
    refusing (:class:`LayoutError`) a teacher of another vocabulary or family, or whose heads ``tp`` does not divide."""
    from vigos_megatron.config.teacher import stage_layers

    if (t.vocab_size, t.vision.pixel_unit, type(t.vision)) != (m.vocab_size, m.vision.pixel_unit, type(m.vision)):
        raise LayoutError(f"teacher: {t.name or 'the teacher'} differs from the student {m.name} in vocabulary or family")
    for what, n in (("num_attention_heads", t.num_attention_heads), ("num_key_value_heads", t.num_key_value_heads)):
        if n % tp:
            raise LayoutError(f"parallel.tp: {tp} does not divide the teacher's {what}={n}")
    try:
        counts = stage_layers(t.num_layers, pp)
    except ValueError as e:
        raise LayoutError(str(e)) from None
    t.vision.check_layout(tp, 1, counts[0])  # TP divides its ViT heads; its deepstack layers on the first stage
    return counts


def estimate_memory(model, *, tp: int, pp: int, dp: int, workload: Workload | None = None,
                    teacher=None, **workload_fields) -> MemoryEstimate:
    """Per-GPU memory of ``model`` at ``tp x pp x dp`` (see the module docstring for every term).

    Args:
        model: a :class:`ModelShape`, a ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig``, a ``config.json``
            dict, a HF directory or a known model name ("qwen3_vl_8b", "qwen2_5_vl_7b", "7b").
        teacher: a teacher of its own (anything ``model`` accepts); None: the replica of the student.
        tp, pp, dp: tensor, pipeline and data parallel sizes.
        workload: the step's shape; ``workload_fields`` (``prompt_tokens=``, ``completion_tokens=``,
            ``micro_batch_size=``, ``recompute=``, ...) replace single fields of it.

    Raises:
        LayoutError: a layout the model or the batch cannot take, naming the option.
    """
    m = as_model_shape(model)
    w = dataclasses.replace(workload or Workload(), **workload_fields)
    w.validate()
    m.check_layout(tp, pp)
    if dp < 1:
        raise LayoutError(f"dp: must be >= 1, got {dp}")
    if w.global_batch_size % dp:
        raise LayoutError(f"train.global_batch_size: {w.global_batch_size} does not split over dp={dp}")
    per_rank = w.global_batch_size // dp
    if per_rank % w.micro_batch_size:
        raise LayoutError(f"train.micro_batch_size: {w.micro_batch_size} does not divide the {per_rank} "
                          f"prompts per data-parallel rank")
    t = m if teacher is None else as_model_shape(teacher)
    t_layers = [m.num_layers // pp] * pp if teacher is None else teacher_layers(m, t, tp, pp)
    stages = [_stage(m, w, tp, pp, dp, s, per_rank, t, t_layers[s]) for s in range(pp)]
    peaks = tuple(sum(st.values()) + max(sum(tr.values()), sum(ro.values())) for st, tr, ro, _ in stages)
    worst = max(range(pp), key=lambda s: peaks[s])
    static, train, rollout, params = stages[worst]
    total = sum(sum(m.stage_params(1, pp, s)) for s in range(pp)) - (pp > 1 and m.tie_word_embeddings) * (
        m.vocab_size * m.hidden_size)
    return MemoryEstimate(tp=tp, pp=pp, dp=dp, stage=worst, static=static, train=train, rollout=rollout,
                          stage_peaks=peaks, rank_params=params, model_params=total, workload=w)


def stage_activation_bytes(model, *, tp: int, pp: int, stage: int, rows: int, seq: int, spec: str,
                           recompute: str = "none", logit_rows: int | None = None,
                           final_norm_spec: str | None = None) -> int:
    """Bytes autograd keeps for one micro-batch of ``rows`` student rows of ``seq`` tokens on one
    rank of pipeline stage ``stage`` (bf16; the received stream tensor and parameters excluded).

    Its layers' per-token and per-layer terms (:meth:`ModelShape.layer_bytes_per_token`,
    :meth:`ModelShape.layer_extra_bytes`); with full recomputation the fp32 rotary table ``4d``
    per token, and on stages > 0 the first layer's checkpointed input is the received tensor (not
    counted here); on the first stage the int64 input ids (and the vocabulary-parallel
    embedding's bool mask at TP > 1); on the last stage the final norm over every position and
    the output layer's input at ``logit_rows`` positions (default: every position).
    """
    m = as_model_shape(model)
    h = m.hidden_size
    tok = rows * seq
    total = (m.num_layers // pp) * (m.layer_bytes_per_token(tp, spec, recompute) * tok
                                   + m.layer_extra_bytes(rows, seq, tp, spec, recompute))
    if recompute == "full":
        total += 4 * m.head_dim * tok
    if stage == 0:
        total += (8 + (tp > 1)) * tok
    elif recompute == "full":
        total -= 2 * h * tok
    if stage == pp - 1:
        norm = (2 * h + 4) if (final_norm_spec or spec) == "transformer_engine" else (8 * h + 4)
        total += norm * tok + 2 * h * (tok if logit_rows is None else logit_rows)
    return total


def _stage(m: ModelShape, w: Workload, tp: int, pp: int, dp: int, s: int, per_rank: int, t: ModelShape,
           t_layers: int):
    first, last = s == 0, s == pp - 1
    lang, vision = m.stage_params(tp, pp, s)
    n = lang + vision
    trainable = lang + (0 if w.freeze_vision else vision)
    shard = dp if (w.distributed_optimizer and dp > 1) else 1
    static = {
        "student parameters (bf16)": 2 * n,
        f"gradient buffer ({'fp32' if w.grad_reduce_in_fp32 else 'bf16'})": (4 if w.grad_reduce_in_fp32 else 2) * trainable,
        f"optimizer states (fp32 main + Adam m, v; /{shard})": -(-12 * trainable // shard),
        "teacher parameters (bf16, frozen)": 2 * sum(t.stage_params(tp, pp, s, layers=t_layers)),
    }

    # ---- training phase
    h, v_local = m.hidden_size, m.vocab_size // tp
    layers = m.num_layers // pp
    per_rollout = objectives.get(w.objective).rows  # (student, teacher)
    ks, kt = per_rollout.stream
    img_s, img_t = per_rollout.image
    ls, lt = per_rollout.logits
    mb = w.micro_batch_size
    seq = w.seq_length
    ns, nt = ks * mb, kt * mb
    tok_s = ns * seq
    in_flight = min(pp - s, per_rank // mb)
    patches = w.image_tokens * m.vision.patches_per_token
    n_logit_s = ls * mb * w.completion_tokens if w.logits_at_loss_positions_only else ns * seq
    n_logit_t = lt * mb * w.completion_tokens if w.logits_at_loss_positions_only else nt * seq

    per_mb = stage_activation_bytes(m, tp=tp, pp=pp, stage=s, rows=ns, seq=seq, spec=w.layer_spec,
                                    recompute=w.recompute, logit_rows=n_logit_s, final_norm_spec=w.layer_spec)
    title = f"student activations, {layers} layers x {in_flight} micro-batch(es) ({w.recompute} recompute)"
    train = {title: in_flight * per_mb}
    vis = m.vision
    n_deep = vis.deepstack_layers
    if first and not w.freeze_vision:
        train[f"student vision activations ({'checkpointed' if w.vision_recompute else 'stored'})"] = (
            in_flight * mb * img_s * patches * vis.stored_bytes_per_patch(w.vision_recompute, tp))
    if first and n_deep:
        train[f"deepstack features ({n_deep} x image tokens x H, bf16)"] = (
            in_flight * mb * img_s * n_deep * w.image_tokens * h * 2)
    if not first:
        train["received pipeline stream tensors"] = in_flight * 2 * seq * (ns * h + nt * t.hidden_size)
    if last:
        train.update(loss_bytes(w, h, v_local, n_logit_s, n_logit_t, t.hidden_size))
    transients = {
        "teacher rows, one layer (no grad)": nt * seq * t.forward_bytes_per_token(tp)
        + (nt * (4 * t.num_attention_heads // tp) * seq * seq + seq * seq if w.layer_spec == "local" else 0),
    }
    if w.recompute == "full":
        transients["one student layer recomputed in backward"] = (
            m.layer_bytes_per_token(tp, w.layer_spec) * tok_s + m.layer_extra_bytes(ns, seq, tp, w.layer_spec))
    if first:
        transients["teacher vision tower (no grad) + image embeddings"] = mb * (
            patches * t.vision.forward_bytes_per_patch(tp)
            + img_t * (1 + t.vision.deepstack_layers) * w.image_tokens * t.hidden_size * 2)
        if w.vision_recompute and not w.freeze_vision:
            transients["one student vision block recomputed"] = mb * img_s * patches * vis.block_bytes_per_patch(tp)
    key = max(transients, key=transients.get)
    train[f"largest transient: {key}"] = transients[key]

    # ---- rollout phase
    b = min(per_rank, w.rollout_batch_size)
    plen, total_len = w.prompt_tokens, w.prompt_tokens + w.completion_tokens
    kv = b * total_len * m.kv_bytes_per_token(tp, pp)
    rollout = {f"rollout KV cache ({b} x {total_len} tokens, {layers} layers)": kv}
    if first:
        rollout["round embeddings (text + images)"] = 2 * b * plen * h + 2 * b * (1 + n_deep) * w.image_tokens * h
    group = max(1, min(b, w.prefill_max_tokens // plen))
    prefill = group * plen * m.forward_bytes_per_token(tp)
    if w.rollout_layer_spec == "local":
        prefill += group * (4 * m.num_attention_heads // tp) * plen * plen + plen * plen
    r_trans = {f"prefill of {group} prompt(s) through one layer": prefill}
    if first:
        r_trans[f"vision tower over the round's {b} image(s) (no grad)"] = b * patches * vis.forward_bytes_per_patch(tp)
    key = max(r_trans, key=r_trans.get)
    rollout[f"largest transient: {key}"] = r_trans[key]
    return static, train, rollout, (lang, vision)


def estimate_for_config(cfg, world_size: int, model=None, teacher=None, **workload_fields) -> MemoryEstimate:
    """The estimate of a :class:`~vigos_megatron.config.train.PretrainConfig` on ``world_size`` GPUs.

    ``model``: the shape to plan for; default the ``config.json`` under ``model.hf_path`` /
    ``model.init_checkpoint``; ``teacher``: the teacher's (default: ``model.teacher``'s ``config.json``
    when it names a checkpoint of its own, else the replica). The layout is checked with
    :func:`~vigos_megatron.config.train.validate_layout` first.
    """
    from vigos_megatron.config.train import _hf_config_json, validate_layout

    layout = validate_layout(cfg, world_size)
    if model is None:
        raw = _hf_config_json(cfg)
        if raw is None:
            raise LayoutError("model: no config.json under model.hf_path / model.init_checkpoint; pass model= "
                              "(a known name such as 'qwen3_vl_8b' or a HF config)")
        model = raw
    if teacher is None and cfg.model.teacher.separate:
        from vigos_megatron.config.teacher import read_config, teacher_hf_dir

        teacher = read_config("model.teacher", teacher_hf_dir(cfg.model.teacher))
    return estimate_memory(model, tp=layout.tp, pp=layout.pp, dp=layout.dp, teacher=teacher,
                           workload=Workload.from_config(cfg, model, **workload_fields))


# --------------------------------------------------------------------------- layout search


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(model, world_size: int, workload: Workload | None = None, *, max_tp: int = 8, teacher=None):
    """Every ``(tp, pp, dp)`` with ``tp * pp * dp = world_size`` the model (and a ``teacher`` of its own) and the
    batch accept (TP <= ``max_tp``)."""
    m = as_model_shape(model)
    t = None if teacher is None else as_model_shape(teacher)
    w = workload or Workload()
    out = []
    for tp in _divisors(world_size):
        if tp > max_tp:
            continue
        for pp in _divisors(world_size // tp):
            dp = world_size // (tp * pp)
            try:
                m.check_layout(tp, pp)
                if t is not None:
                    teacher_layers(m, t, tp, pp)
            except LayoutError:
                continue
            if w.global_batch_size % dp or (w.global_batch_size // dp) % w.micro_batch_size:
                continue
            out.append((tp, pp, dp))
    return out


def choose_layout(model, world_size: int, workload: Workload | None = None, *, max_tp: int = 8,
                  tune_rollout_batch: bool = False, gpu_memory_gib: float = GPU_80GB_GIB,
                  reserve_gib: float = DEFAULT_RESERVE_GIB, teacher=None) -> MemoryEstimate | None:
    """The preferred layout on ``world_size`` GPUs that fits, or None.

    Preference: the smallest model-parallel group ``tp * pp`` (the most data parallelism), then
    the fewer pipeline stages, then the larger rollout batch, then the lower peak.
    ``tune_rollout_batch``: also try rollout batches (``sampling.max_batch_size``) halving from
    the workload's down to 1 for each layout, keeping the largest that fits.
    """
    w = workload or Workload()
    fitting = []
    for tp, pp, dp in candidate_layouts(model, world_size, w, max_tp=max_tp, teacher=teacher):
        batch = min(w.rollout_batch_size, w.global_batch_size // dp)
        while batch >= 1:
            est = estimate_memory(model, tp=tp, pp=pp, dp=dp, teacher=teacher,
                                  workload=dataclasses.replace(w, rollout_batch_size=batch))
            if est.fits(gpu_memory_gib, reserve_gib):
                fitting.append(est)
                break
            if not tune_rollout_batch:
                break
            batch //= 2
    if not fitting:
        return None
    return min(fitting, key=lambda e: (e.tp * e.pp, e.pp, -e.workload.rollout_batch_size, e.peak_bytes))


#: GPU counts the recipes consider (1 node of up to 8 GPUs, then whole nodes)
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def smallest_world_size(model, workload: Workload | None = None, *, world_sizes=WORLD_SIZES,
                        **kwargs) -> MemoryEstimate | None:
    """The estimate of the chosen layout at the smallest GPU count in ``world_sizes`` that fits."""
    for n in world_sizes:
        est = choose_layout(model, n, workload, **kwargs)
        if est is not None:
            return est
    return None
