"""On-policy generation from the student's own Megatron model chunks (TP/PP), with a KV cache.

:class:`MegatronRolloutEngine` drives megatron-bridge's ``Qwen25VLModel`` / ``Qwen3VLModel`` directly
(the family's differences through :mod:`vigos_megatron.models.family`), one round of at most
``sampling.max_batch_size`` prompts at a time:

* **Prefill.** The first pipeline stage embeds the left-padded prompts
  (:mod:`~vigos_megatron.rollout.prompt_batch`), runs the vision tower once per distinct
  image of the round (all images of the round in one call) and scatters the image embeddings
  into the ``<|image_pad|>`` rows (Qwen3-VL: its deepstack features are added after the first
  layers at the same rows, :class:`~vigos_megatron.rollout.prompt_batch.DeepstackRows`); then
  each stage runs its decoder layers through
  :class:`~vigos_megatron.rollout.cached_forward.CachedStageForward` (the layers' own modules,
  keys rotated with their mrope positions and stored in a
  :class:`~vigos_megatron.rollout.kv_cache.RoundKVCache`), in blocks of at most
  ``prefill_max_tokens`` tokens: row groups of whole prompts, or one row in column chunks when a
  prompt is longer (a chunk attends to the cached columns before it). The last stage runs its
  last layer's attention and MLP, the final norm and the output layer for the last column only.
  ``Qwen25VLModel.forward`` is bypassed because it neither passes a cache to its language model
  nor takes positions.
* **Decode.** One token per live row per step, at one cache column: the step's mrope positions
  are that column of the round's position table (``[3, n, 1]``), the padding mask is a view of the
  cache's additive mask (``[n, 1, 1, col + 1]``), rotary ``cos``/``sin`` are computed once per
  step for all layers, and attention reads the rotated cache as it is (nothing over the prefix is
  recomputed: the cost per token grows only by reading the cache). Rows that finished are
  compacted out of the cache (:meth:`RoundKVCache.compact`) and cost nothing afterwards.
  ``decode_mode`` "graphs" (default on CUDA at TP=1) replays the step on static shapes per batch
  bucket from CUDA graphs (:mod:`~vigos_megatron.rollout.static_decode`), "static" runs those
  shapes eagerly, "dynamic" (default elsewhere) the exact shapes.
* **Pipeline.** Each stage receives ``[S, B_live, H]`` from the previous stage and sends its
  output on (:mod:`~vigos_megatron.rollout.pipeline_p2p`, plain send/recv over the PP group);
  the last stage computes only the last column's logits ``[B_live, V/tp]`` (final norm and
  output layer on that column, no TP gather), chooses the tokens (:mod:`~vigos_megatron.rollout.sampling`,
  identical on every TP rank) and broadcasts them over the PP group. Every rank then applies the
  same stop rule, so all ranks of the model-parallel group leave the loop together and return
  the same completions. DP ranks are independent (different prompts, no communication).
* **Hygiene.** Runs under ``torch.no_grad()`` with every module of the chunks in eval mode; the
  previous per-module training flags and the decoder's pipeline input tensor are restored
  afterwards; no hooks, no parameter changes. The KV cache, the round's tensors and any growth
  of megatron's global attention workspace are released before :meth:`generate` returns
  (``last_buffers`` holds weak references to them for tests). Everything is allocated on the
  model's device (:func:`vigos_megatron.runtime.model_device`).
* **CPU GEMMs.** On the CPU (fp32) the stage's linears run on a copy of the weights packed at
  the start of each :meth:`generate` call and dropped at its end
  (:meth:`~vigos_megatron.rollout.cached_forward.EvalLinear.pack`: :mod:`~vigos_megatron.rollout.cpu_linear`'s
  C kernel, oneDNN where it cannot be built); the last bits of the logits differ from the training
  forward's.

Requirements: megatron-core ``TransformerLayer`` s with ``SelfAttention`` and a dense MLP (the
local or sdpa spec; :func:`~vigos_megatron.rollout.cached_forward.check_layer` says what else),
no sequence parallelism, one model chunk per rank (no virtual pipeline). ``use_kv_cache=False``
(a reference for tests) recomputes the whole sequence at every step with megatron's own
``GPTModel`` forward and an explicit causal+padding mask, so its core attention must apply that
mask whatever the mask type (``transformer_impl`` "local": megatron-core's
``DotProductAttention``, or "sdpa": :class:`vigos_megatron.models.specs.SDPADotProductAttention`;
Transformer Engine's attention is refused).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from vigos_megatron.config.sampling import SamplingConfig
from vigos_megatron.models.family import family_of
from vigos_megatron.rollout.cached_forward import CachedStageForward
from vigos_megatron.rollout.kv_cache import RoundKVCache, preserve_global_memory_buffer
from vigos_megatron.rollout.pipeline_p2p import PipelineLinks
from vigos_megatron.rollout.prompt_batch import (
    PromptRound,
    build_round,
    causal_padding_mask,
    DeepstackRows,
    prompt_mrope_positions,
)
from vigos_megatron.rollout.sampling import sample_next_tokens
from vigos_megatron.rollout.static_decode import DECODE_MODES, StaticDecode
from vigos_megatron.runtime import model_device

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass
class RolloutPrompt:
    """One prompt to complete.

    ``input_ids``: int64 ``[L]``, the student context prefix (ends with the ``<description>``
    prefill), image placeholders already expanded. ``pixel_values``: ``[patches, C*T*P*P]``
    (:class:`~vigos_megatron.data.contexts.ContextEncoder` output) or ``None`` for text only;
    ``image_grid_thw``: int64 ``[n_images, 3]``. ``sample_id``: global sample index (keys the
    sampling noise, so it must differ between samples that should differ).
    """

    input_ids: Tensor
    pixel_values: Tensor | None
    image_grid_thw: Tensor | None
    sample_id: int


@dataclass
class RolloutCompletion:
    """Generated ids (int64 ``[n]``, CPU; the stop token included when one was generated) and why it ended."""

    token_ids: Tensor
    finish_reason: str  # "stop" | "length"

    @property
    def length(self) -> int:
        return int(self.token_ids.numel())


class RolloutEngine(Protocol):
    """What the training loop needs from a generator (Megatron-native here; vLLM with refit later)."""

    def generate(self, prompts: list[RolloutPrompt], sampling: SamplingConfig, *, step: int = 0) -> list[RolloutCompletion]:
        ...


@dataclass
class GenerationStats:
    """Counters and timings of the last :meth:`MegatronRolloutEngine.generate` call (this rank)."""

    prompts: int = 0
    rounds: int = 0
    #: unpadded prompt tokens
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    #: per round, wall time of decode step t (index t-1), t >= 1, each ending with the token broadcast
    step_seconds: list[list[float]] = field(default_factory=list)
    #: largest KV cache held on this rank (bytes)
    kv_cache_bytes: int = 0
    #: static decode: rows computed as bucket padding (summed over steps); CUDA graphs captured, their time
    padding_rows: int = 0
    graph_captures: int = 0
    capture_seconds: float = 0.0


def _unwrap(chunk):
    m = chunk
    while not hasattr(m, "language_model") and hasattr(m, "module"):
        m = m.module
    if not hasattr(m, "language_model"):
        raise TypeError(f"expected a megatron-bridge Qwen VL model chunk (with .language_model), got {type(chunk).__name__}")
    return m


def _last_token_logits(*, hidden_states, output_layer, output_weight, **_unused):
    """GPTModel ``output_processor``: logits of the last column only, ``[B, V/tp]`` (no TP gather)."""
    logits, _ = output_layer(hidden_states[-1:], weight=output_weight, runtime_gather_output=False)
    return logits[0]


class MegatronRolloutEngine:
    """Sample completions from this rank's student chunks (see the module docstring).

    Args:
        chunks: this rank's model chunks (one ``Qwen25VLModel`` / ``Qwen3VLModel``; DDP / fp16 wrappers are unwrapped).
        hf_config: the HF config (``Qwen2_5_VLConfig`` / ``Qwen3VLConfig``: image/video token ids, vocabulary size).
        stop_token_ids: a completion ends right after any of them (e.g. ``<|im_end|>``, ``<|endoftext|>``).
        pad_token_id: fills left padding (never attended to).
        pg_collection: megatron process groups (``.tp``, ``.pp``); default the language model's.
        use_kv_cache: False recomputes the whole sequence at every step (a reference for tests).
        prefill_max_tokens: prompts are prefilled in blocks of at most this many tokens (row groups,
            or column chunks of one row when a prompt is longer). Default: 32768 on CUDA; 2048 on
            the CPU, where larger blocks make the element-wise work several times slower per token
            (activations of tens of MB leave the caches and are page-faulted in at every op).
        decode_mode: one of ``DECODE_MODES`` (module docstring); default "graphs" on CUDA without
            tensor parallelism, else "dynamic".
    """

    def __init__(
        self,
        chunks: list,
        *,
        hf_config,
        stop_token_ids: Sequence[int],
        pad_token_id: int,
        pg_collection=None,
        use_kv_cache: bool = True,
        prefill_max_tokens: int | None = None,
        decode_mode: str | None = None,
    ):
        if len(chunks) != 1:
            raise ValueError(f"MegatronRolloutEngine takes one model chunk per rank (no virtual pipeline), got {len(chunks)}")
        self.chunks = list(chunks)
        self.model = _unwrap(chunks[0])
        self.family = family_of(self.model)
        self.lm = self.model.language_model
        cfg = self.lm.config
        if getattr(cfg, "sequence_parallel", False):
            raise ValueError("MegatronRolloutEngine: sequence_parallel must be off (a decode step has one token per row)")
        if getattr(cfg, "flash_decode", False):
            raise ValueError("MegatronRolloutEngine: flash_decode is not supported (the engine keeps its own KV cache)")
        if not use_kv_cache:
            self._check_core_attention()
        stops = [int(s) for s in stop_token_ids]
        if not stops:
            raise ValueError("stop_token_ids: give at least one token id (e.g. <|im_end|>)")
        cuda = model_device(self.chunks).type == "cuda"
        if prefill_max_tokens is None:
            prefill_max_tokens = 32768 if cuda else 2048
        if prefill_max_tokens < 1:
            raise ValueError(f"prefill_max_tokens: must be >= 1, got {prefill_max_tokens}")
        self.stop_token_ids = tuple(stops)
        self.pad_token_id = int(pad_token_id)
        self.use_kv_cache = bool(use_kv_cache)
        self.prefill_max_tokens = int(prefill_max_tokens)
        self.stage = CachedStageForward(self.lm) if self.use_kv_cache else None

        pg = pg_collection if pg_collection is not None else self.lm.pg_collection
        tp = getattr(pg, "tp", None)
        self.tp_group = tp if tp is not None and dist.get_world_size(tp) > 1 else None
        self.tp_rank = dist.get_rank(tp) if self.tp_group is not None else 0
        # graphs by default only where no tensor-parallel collective would be captured
        mode = decode_mode or ("graphs" if cuda and use_kv_cache and self.tp_group is None else "dynamic")
        if mode not in DECODE_MODES or (mode == "graphs" and not cuda) or (mode != "dynamic" and not use_kv_cache):
            raise ValueError(f"decode_mode: expected one of {', '.join(DECODE_MODES)} ('graphs' on CUDA, "
                             f"'dynamic' without the KV cache), got {decode_mode!r}")
        self.decode_mode = mode
        self.pp = PipelineLinks.of(getattr(pg, "pp", None))
        self.pre_process, self.post_process = bool(self.model.pre_process), bool(self.model.post_process)
        if (self.pp.is_first, self.pp.is_last) != (self.pre_process, self.post_process):
            raise ValueError(f"chunk has pre_process={self.pre_process} post_process={self.post_process} but is "
                             f"pipeline stage {self.pp.rank} of {self.pp.size}")

        self.hidden_size = cfg.hidden_size
        self.pipe_dtype = getattr(cfg, "pipeline_dtype", None) or cfg.params_dtype
        text = getattr(hf_config, "text_config", hf_config)
        self.vocab_size = int(text.vocab_size)
        self.image_token_id = int(hf_config.image_token_id)
        self.video_token_id = int(hf_config.video_token_id)
        self.merge_size = int(hf_config.vision_config.spatial_merge_size)

        #: the timer of ``last_stats`` (seconds); a benchmark on a shared machine may use ``time.process_time``
        self.clock = time.perf_counter
        self.last_stats = GenerationStats()
        #: weak references to the last call's KV cache and round tensors (all dead once generate returns)
        self.last_buffers: list[weakref.ref] = []

    # ------------------------------------------------------------------ checks

    def _check_core_attention(self) -> None:
        """The recomputation path (``use_kv_cache=False``) runs the layers' own attention with the
        padding mask: only core attentions that always apply it are accepted there (the cached path
        attends with its own kernel, whatever the layer spec: local, sdpa or Transformer Engine)."""
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        from vigos_megatron.models.specs import SDPADotProductAttention

        for layer in getattr(self.lm.decoder, "layers", []):
            core = layer.self_attention.core_attention
            # Bridge's Qwen3VLSelfAttention replaces a local DotProductAttention by its own causal path (no mask)
            ignores_mask = isinstance(core, DotProductAttention) and type(layer.self_attention).__name__ == "Qwen3VLSelfAttention"
            if not isinstance(core, (DotProductAttention, SDPADotProductAttention)) or ignores_mask:
                raise ValueError(
                    f"use_kv_cache=False needs a core attention that applies the explicit padding mask "
                    f"(transformer_impl 'local' for Qwen2.5-VL, 'sdpa' for both families); layer "
                    f"{layer.layer_number} uses {type(core).__name__} in {type(layer.self_attention).__name__}"
                )

    def _check_prompt(self, i: int, p: RolloutPrompt) -> None:
        ids = p.input_ids
        if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.numel() == 0 or ids.dtype != torch.int64:
            raise ValueError(f"prompts[{i}].input_ids: expected a non-empty int64 1-D tensor, got "
                             f"{getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))}")
        if int((ids == self.video_token_id).sum()) > 0:
            raise ValueError(f"prompts[{i}]: video tokens are not supported by the rollout engine")
        n_img_tokens = int((ids == self.image_token_id).sum())
        if (p.pixel_values is None) != (p.image_grid_thw is None):
            raise ValueError(f"prompts[{i}]: pixel_values and image_grid_thw must both be given or both be None")
        expected = 0
        if p.image_grid_thw is not None:
            g = p.image_grid_thw
            if g.dim() != 2 or g.shape[1] != 3:
                raise ValueError(f"prompts[{i}].image_grid_thw: expected int64 [n_images, 3], got {tuple(g.shape)}")
            if int(g.prod(-1).sum()) != p.pixel_values.shape[0]:
                raise ValueError(f"prompts[{i}]: pixel_values has {p.pixel_values.shape[0]} patches, image_grid_thw "
                                 f"implies {int(g.prod(-1).sum())}")
            expected = int((g.prod(-1) // self.merge_size**2).sum())
        if n_img_tokens != expected:
            raise ValueError(f"prompts[{i}]: {n_img_tokens} <|image_pad|> tokens but the image grid gives {expected}")

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: list[RolloutPrompt], sampling: SamplingConfig, *, step: int = 0) -> list[RolloutCompletion]:
        """Complete every prompt; collective over the TP x PP group (same prompts on every rank of it).

        Prompts are sorted by length (longest first) and decoded in rounds of at most
        ``sampling.max_batch_size``; the result is in the order of ``prompts``.
        """
        sampling.validate()
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        for i, p in enumerate(prompts):
            self._check_prompt(i, p)
        self.last_stats = GenerationStats(prompts=len(prompts))
        self.last_buffers = []
        if not prompts:
            return []
        device = model_device(self.chunks)
        modules = [m for c in self.chunks for m in c.modules()]
        flags = [m.training for m in modules]
        decoder = self.lm.decoder
        prev_input = getattr(decoder, "input_tensor", None)
        results: list[RolloutCompletion | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -prompts[i].input_ids.numel())
        try:
            with torch.no_grad(), preserve_global_memory_buffer():
                for m in modules:
                    m.training = False
                if self.stage is not None:  # the current weights, packed on the CPU
                    self._track(*(lin.pack() for lin in self.stage.linears))
                for r0 in range(0, len(order), sampling.max_batch_size):
                    rows = order[r0 : r0 + sampling.max_batch_size]
                    outs = self._generate_round([prompts[i] for i in rows], sampling, step, device)
                    for i, out in zip(rows, outs):
                        results[i] = out
        finally:
            if self.stage is not None:
                for lin in self.stage.linears:
                    lin.unpack()
            for m, f in zip(modules, flags):
                m.training = f
            if hasattr(decoder, "input_tensor"):
                decoder.input_tensor = prev_input
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ one round

    def _track(self, *tensors) -> None:
        for t in tensors:
            if isinstance(t, Tensor):
                self.last_buffers.append(weakref.ref(t))

    def _generate_round(self, batch: list[RolloutPrompt], sampling: SamplingConfig, step: int, device) -> list[RolloutCompletion]:
        stats = self.last_stats
        stats.rounds += 1
        max_new = sampling.max_new_tokens
        positions = [
            prompt_mrope_positions(self.model, p.input_ids, p.image_grid_thw) for p in batch
        ]
        rnd = build_round([p.input_ids for p in batch], positions, [p.sample_id for p in batch],
                          max_new_tokens=max_new, pad_token_id=self.pad_token_id, device=device)
        b, plen = rnd.batch_size, rnd.prompt_length
        stats.prompt_tokens += sum(rnd.lengths)
        cache = self._new_cache(rnd) if self.use_kv_cache else None
        static = (StaticDecode(self, rnd, cache, capture=self.decode_mode == "graphs")
                  if cache is not None and self.decode_mode != "dynamic" else None)
        tokens = torch.full((b, max_new), self.pad_token_id, dtype=torch.int64, device=device)
        self._track(rnd.input_ids, rnd.positions, rnd.key_pad, rnd.sample_ids, tokens)

        t0 = self.clock()
        prompt_embeds, deepstack = self._prompt_embeddings(batch, rnd.input_ids) if self.pre_process else (None, None)
        self._track(prompt_embeds, *(deepstack.feats if deepstack is not None else ()))
        logits = self._prefill(rnd, prompt_embeds, deepstack, cache)
        slots = list(range(b))  # slot -> row of the round; live rows occupy the first slots
        finish: list[str | None] = [None] * b
        n_gen = [0] * b
        self._choose_and_record(logits, rnd, slots, 0, tokens, finish, n_gen, sampling, step)
        del logits
        stats.prefill_seconds += self.clock() - t0
        if cache is not None:
            stats.kv_cache_bytes = max(stats.kv_cache_bytes, cache.nbytes())
            self._track(*cache.buffers(), *(static.buffers() if static is not None else ()))

        step_times: list[float] = []
        t_dec = self.clock()
        for t in range(1, max_new):
            ts = self.clock()
            live = [s for s, row in enumerate(slots) if finish[row] is None]
            if not live:
                break
            col = plen + t - 1  # cache column of the token fed at this step
            if len(live) < len(slots):
                if cache is not None:
                    cache.compact(torch.tensor(live, dtype=torch.int64, device=device), length=col)
                slots = [slots[s] for s in live]
            rows = torch.tensor(slots, dtype=torch.int64, device=device)
            if static is not None:
                logits = static.step(rows, tokens[rows, t - 1], col)
            elif cache is not None:
                logits = self._decode_cached(rnd, rows, tokens[rows, t - 1], col, cache)
            else:
                logits = self._decode_recompute(rnd, rows, tokens, prompt_embeds, deepstack, t)
            self._choose_and_record(logits, rnd, slots, t, tokens, finish, n_gen, sampling, step)
            del logits
            step_times.append(self.clock() - ts)
        stats.decode_seconds += self.clock() - t_dec
        stats.step_seconds.append(step_times)

        tokens_cpu = tokens.cpu()
        out = []
        for i in range(b):
            reason = finish[i]
            if reason is None:  # cannot happen: the last step marks every live row "length"
                raise RuntimeError(f"row {i} left the decode loop without a finish reason")
            out.append(RolloutCompletion(token_ids=tokens_cpu[i, : n_gen[i]].clone(), finish_reason=reason))
            stats.generated_tokens += n_gen[i]
        if static is not None:
            static.release()
        if cache is not None:
            cache.release()
        return out

    # ------------------------------------------------------------------ token choice

    def _choose_and_record(self, logits, rnd: PromptRound, slots: list[int], t: int, tokens: Tensor,
                           finish: list, n_gen: list, sampling: SamplingConfig, step: int) -> None:
        """Sample on the last stage, broadcast over PP, record; every rank applies the same stop rule."""
        n = len(slots)
        rows = torch.tensor(slots, dtype=torch.int64, device=tokens.device)
        if self.post_process:
            vl = logits.shape[-1]
            tok = sample_next_tokens(
                logits, vocab_start=self.tp_rank * vl, sampling=sampling, step=step,
                sample_ids=rnd.sample_ids[rows], positions=torch.full((n,), t, dtype=torch.int64, device=tokens.device),
                tp_group=self.tp_group, vocab_size=self.vocab_size,
            )
        else:
            tok = torch.empty(n, dtype=torch.int64, device=tokens.device)
        tok = self.pp.broadcast_from_last(tok)
        tokens[rows, t] = tok
        last = t + 1 == tokens.shape[1]
        for row, tid in zip(slots, tok.tolist()):
            n_gen[row] = t + 1
            if tid in self.stop_token_ids:
                finish[row] = FINISH_STOP
            elif last:
                finish[row] = FINISH_LENGTH

    # ------------------------------------------------------------------ forwards

    def _prompt_embeddings(self, batch: list[RolloutPrompt], input_ids: Tensor) -> tuple[Tensor, DeepstackRows | None]:
        """First stage: ``[P, B, H]`` token embeddings with every image's vision-tower output merged in,
        and the deepstack inputs (``None`` for a family without deepstack or a round without images).

        The vision tower runs once per distinct ``pixel_values`` tensor of the round (all of them in
        one call); its merged patch embeddings replace the ``<|image_pad|>`` rows in order.
        """
        emb = self.lm.embedding(input_ids=input_ids, position_ids=None)  # [P, B, H]
        with_image = [i for i, p in enumerate(batch) if p.pixel_values is not None]
        if not with_image:
            return emb, None
        uniq: dict[int, int] = {}
        pix, grids = [], []
        for i in with_image:
            key = id(batch[i].pixel_values)
            if key not in uniq:
                uniq[key] = len(pix)
                pix.append(batch[i].pixel_values)
                grids.append(batch[i].image_grid_thw)
        dev = emb.device
        feats = self.family.image_features(self.model, torch.cat(pix).to(dev), torch.cat(grids).to(dev))
        # feats: one ImageFeatures per image (grid row), in order -> per distinct pixel tensor
        per_prompt, k = [], 0
        for g in grids:
            per_prompt.append(feats[k: k + g.shape[0]])
            k += g.shape[0]
        emb = emb.transpose(0, 1).contiguous()  # [B, P, H]
        mask = input_ids == self.image_token_id  # [B, P]
        n_deep = len(feats[0].deepstack)
        deep_rows: list[list[Tensor]] = [[] for _ in range(n_deep)]
        for i in range(len(batch)):
            if i not in with_image:
                continue
            f = per_prompt[uniq[id(batch[i].pixel_values)]]
            emb[i, mask[i]] = torch.cat([x.embeds for x in f]).to(emb.dtype)
            for layer in range(n_deep):
                deep_rows[layer].append(torch.cat([x.deepstack[layer] for x in f]))
        deepstack = DeepstackRows(mask, [torch.cat(d).to(emb.dtype) for d in deep_rows]) if n_deep else None
        return emb.transpose(0, 1).contiguous(), deepstack

    def _stage_forward(self, decoder_input, position_ids: Tensor, mask: Tensor, context, seq_len: int, rows: int,
                       deepstack_kwargs: dict):
        """This stage's language model on ``rows`` rows of ``seq_len`` tokens; last stage -> ``[rows, V/tp]`` logits."""
        if not self.pre_process:
            x = self.pp.recv_prev((seq_len, rows, self.hidden_size), self.pipe_dtype, position_ids.device)
            self.model.set_input_tensor(x)
        out = self.lm(
            input_ids=None,
            position_ids=position_ids,
            attention_mask=mask,
            decoder_input=decoder_input,
            inference_context=context,
            output_processor=_last_token_logits if self.post_process else None,
            **(deepstack_kwargs if self.pre_process else {}),
        )
        if not self.post_process:
            self.pp.send_next(out.to(self.pipe_dtype))
            return None
        return out

    def _new_cache(self, rnd: PromptRound) -> RoundKVCache:
        st = self.stage
        return RoundKVCache(layers=len(st.layers), batch=rnd.batch_size, columns=rnd.max_columns,
                            kv_heads=st.kv_heads, head_dim=st.head_dim, dtype=self.lm.config.params_dtype,
                            key_pad=rnd.key_pad, prompt_columns=rnd.prompt_length,
                            zeroed=self.decode_mode != "dynamic")

    def _prefill_chunks(self, batch: int, plen: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """``((r0, r1), (c0, c1))`` blocks of at most ``prefill_max_tokens`` tokens covering ``[B, P]``:
        row groups of whole prompts, or one row at a time in column chunks when ``P`` exceeds it."""
        budget = self.prefill_max_tokens
        if plen <= budget:
            g = budget // plen
            return [((r0, min(batch, r0 + g)), (0, plen)) for r0 in range(0, batch, g)]
        return [((r, r + 1), (c0, min(plen, c0 + budget))) for r in range(batch) for c0 in range(0, plen, budget)]

    def _prefill(self, rnd: PromptRound, prompt_embeds, deepstack: DeepstackRows | None, cache: RoundKVCache | None):
        """All prompt columns in blocks (:meth:`_prefill_chunks`); the last stage returns ``[B, V/tp]``
        logits of column ``P - 1``."""
        b, plen = rnd.batch_size, rnd.prompt_length
        parts = []
        if cache is None:  # full recomputation: megatron's own forward, whole prompts in row groups
            g = max(1, self.prefill_max_tokens // plen)
            for r0, r1 in ((r0, min(b, r0 + g)) for r0 in range(0, b, g)):
                mask = causal_padding_mask(rnd.key_pad[r0:r1], 0, plen)
                x = prompt_embeds[:, r0:r1] if prompt_embeds is not None else None
                deep = deepstack.model_kwargs(slice(r0, r1), plen) if deepstack is not None else {}
                parts.append(self._stage_forward(x, rnd.positions[:, r0:r1, :plen], mask, None, plen, r1 - r0, deep))
            return torch.cat(parts) if self.post_process else None
        dev = rnd.key_pad.device
        for (r0, r1), (c0, c1) in self._prefill_chunks(b, plen):
            q = torch.arange(c0, c1, device=dev)[:, None]
            k = torch.arange(c1, device=dev)[None, :]
            # [b, 1, s, c1]: 0 where visible and not after the query, else -inf; every query sees
            # itself (padding queries too, so that no row is empty)
            bias = cache.bias[r0:r1, None, None, :c1].masked_fill(k > q, float("-inf")).masked_fill_(k == q, 0.0)
            x = prompt_embeds[c0:c1, r0:r1] if prompt_embeds is not None else None
            rope = self.stage.rope(rnd.positions[:, r0:r1, c0:c1], self.lm.config.params_dtype)
            deep = deepstack.block((r0, r1), (c0, c1)) if deepstack is not None else None
            out = self._cached_forward(x, rope, cache, (r0, r1), (c0, c1), bias, deep)
            if c1 == plen:
                parts.append(out)
        return torch.cat(parts) if self.post_process else None

    def _decode_cached(self, rnd: PromptRound, rows: Tensor, feed: Tensor, col: int, cache: RoundKVCache):
        """One token per live slot ``[0, n)`` (round rows ``rows``) at cache column ``col``; keys ``[0, col]``."""
        n = rows.numel()
        x, rope = self.decode_inputs(rnd, rows, feed, col, cache)
        return self._cached_forward(x, rope, cache, (0, n), (col, col + 1), cache.bias[:n, None, None, : col + 1])

    def decode_inputs(self, rnd: PromptRound, rows: Tensor, feed: Tensor, col: int, cache: RoundKVCache):
        """Open cache column ``col``; return the first stage's embeddings ``[1, n, H]`` of ``feed``
        (other stages: None) and the step's rotary ``(cos, sin)`` ``[1, n, 1, D]`` (round rows ``rows``)."""
        cache.open_column(col)
        x = self.lm.embedding(input_ids=feed[:, None], position_ids=None) if self.pre_process else None
        return x, self.stage.rope(rnd.positions[:, rows, col : col + 1], self.lm.config.params_dtype)

    def _cached_forward(self, x, rope, cache: RoundKVCache, rows: tuple[int, int], cols: tuple[int, int], bias,
                        deepstack: tuple[Tensor, list] | None = None):
        """This stage's layers on cache rows/columns ``rows``/``cols`` (:class:`CachedStageForward`);
        last stage -> ``[rows, V/tp]`` logits of the last column."""
        s, b = cols[1] - cols[0], rows[1] - rows[0]
        if not self.pre_process:
            x = self.pp.recv_prev((s, b, self.hidden_size), self.pipe_dtype, bias.device)
        h = self.stage(x, rope, cache, rows, cols, bias, last_column_only=self.post_process, deepstack=deepstack)
        if not self.post_process:
            self.pp.send_next(h.to(self.pipe_dtype))
            return None
        return self.logits(h)

    def logits(self, h: Tensor) -> Tensor:
        """Last stage: ``[rows, V/tp]`` logits of hidden states ``h`` ``[1, rows, H]`` (final norm, output layer)."""
        norm = self.lm.decoder.final_layernorm
        if norm is not None:
            h = norm(h)
        if self.stage.output is not None:
            logits, _ = self.stage.output(h)
        else:
            weight = self.lm.shared_embedding_or_output_weight() if self.lm.share_embeddings_and_output_weights else None
            logits, _ = self.lm.output_layer(h, weight=weight, runtime_gather_output=False)
        return logits[0]

    def _decode_recompute(self, rnd: PromptRound, rows: Tensor, tokens: Tensor, prompt_embeds, deepstack, t: int):
        """No cache: the whole sequence (prompt + ``t`` generated tokens) of every live row again."""
        end = rnd.prompt_length + t
        x = None
        if self.pre_process:
            gen = self.lm.embedding(input_ids=tokens[rows, :t], position_ids=None)  # [t, n, H]
            x = torch.cat([prompt_embeds[:, rows], gen], dim=0)
        mask = causal_padding_mask(rnd.key_pad[rows], 0, end)
        deep = deepstack.model_kwargs(rows, end) if deepstack is not None else {}
        return self._stage_forward(x, rnd.positions[:, rows, :end], mask, None, end, rows.numel(), deep)
