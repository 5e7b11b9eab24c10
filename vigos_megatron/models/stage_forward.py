"""A Qwen VL chunk's forward for the training stream: shared image features, logits at chosen positions.

megatron-bridge's ``Qwen25VLModel.forward`` / ``Qwen3VLModel.forward`` do four things: embed the
tokens, run the vision tower on the pixels of every image row and scatter its output into the
``<|image_pad|>`` embeddings, compute the mrope position ids from ``input_ids`` and
``image_grid_thw``, and run the language model (megatron's ``GPTModel``; Qwen3-VL's also adds the
deepstack features after its first layers), whose last stage computes logits at every position.
What differs between the families comes from :mod:`vigos_megatron.models.family`. The training stream needs two things that forward cannot
express, so the stage calls the same modules in the same order through the functions here:

* **one vision-tower pass per image** (:func:`image_features`): a rollout's image appears in
  several rows (student, perception teacher, reasoning or reference teacher); its features
  are computed once per model and micro-batch and scattered into every row that shows it
  (:func:`embed_rows`);
* **logits only where a loss reads them** (:func:`language_forward` with ``logit_positions``):
  GPTModel's public ``output_processor`` hook receives the final-norm hidden states
  ``[S, n, H]``; :func:`_logits_at` applies the output layer to the selected positions only
  and returns ``[N, V/tp]`` instead of ``[n, S, V/tp]``. At 152k vocabulary and 4k-token
  completions in 36k-token rows this is the difference between ``S`` and about ``S/9`` logits
  per row (0.3 MB of bf16 logits per position and TP rank at TP=1).

The result is the same computation as ``Qwen25VLModel.forward`` (``tests/test_schedule.py``
checks loss and gradients against it); the rollout engine (:mod:`vigos_megatron.rollout.engine`)
drives the language model the same way for generation.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from vigos_megatron.models.family import ImageFeatures, family_of


class RowInputs(NamedTuple):
    """The first stage's language-model inputs of ``n`` rows.

    ``decoder_input`` ``[S, n, H]``: token embeddings with image features scattered in;
    ``deepstack``: keyword arguments of the language model for deepstack (Qwen3-VL:
    ``visual_pos_masks`` bool ``[n, S]`` and ``deepstack_visual_embeds``, one
    ``[image tokens of the rows, H]`` tensor per deepstack layer, in the mask's row-major order),
    empty for a family without it.
    """

    decoder_input: Tensor
    deepstack: dict


def image_features(model, pixel_values: Tensor, grid_thw: Tensor) -> list[ImageFeatures]:
    """The model's vision tower on the images ``grid_thw`` describes, in one call.

    Args:
        model: the first pipeline stage's chunk (it owns the vision tower).
        pixel_values: ``[sum_i t_i*h_i*w_i, C*T*P*P]`` flattened patches of the images, concatenated.
        grid_thw: int64 ``[m, 3]``, one line per image.

    Returns one :class:`~vigos_megatron.models.family.ImageFeatures` per image, in order
    (``[t_i*h_i*w_i / merge**2, H]`` features, plus deepstack features for Qwen3-VL).
    """
    return family_of(model).image_features(model, pixel_values, grid_thw)


def embed_rows(model, input_ids: Tensor, row_features: Sequence[ImageFeatures]) -> RowInputs:
    """Token embeddings of ``input_ids`` ``[n, S]`` with image features scattered in (and deepstack inputs).

    ``row_features``: one :class:`ImageFeatures` per image row, in row order; row ``r``'s
    ``<|image_pad|>`` embeddings are replaced by its features, in order (what Bridge's
    ``Qwen25VLModel`` / ``Qwen3VLModel.forward`` do; the sources keep their autograd graph, so a
    trainable tower receives gradients).
    """
    emb = model.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, n, H]
    if not row_features:
        return RowInputs(emb, {})
    emb = emb.transpose(1, 0).contiguous()  # [n, S, H]
    visual = input_ids == model.config.image_token_id  # [n, S]
    mask = visual.unsqueeze(-1).expand_as(emb)
    feats = torch.cat([f.embeds for f in row_features]).to(emb.device, emb.dtype)
    if feats.shape[0] != int(visual.sum()):
        raise ValueError(f"image features of {feats.shape[0]} tokens for {int(visual.sum())} image placeholders")
    emb = emb.masked_scatter(mask, feats).transpose(1, 0)
    n_deep = len(row_features[0].deepstack)
    if n_deep == 0:
        return RowInputs(emb, {})
    deep = [torch.cat([f.deepstack[k] for f in row_features]).to(emb.device, emb.dtype) for k in range(n_deep)]
    return RowInputs(emb, {"visual_pos_masks": visual, "deepstack_visual_embeds": deep})


def mrope_positions(model, input_ids: Tensor, grid_thw: Tensor | None) -> Tensor:
    """The family's mrope position ids ``[3, n, S]`` of right-padded rows ``input_ids`` ``[n, S]``.

    ``grid_thw``: int64 ``[image rows, 3]``, one line per image row in row order. Computed as
    Bridge's model ``forward`` computes them, on every pipeline stage.
    """
    return family_of(model).rope_index(model, input_ids, grid_thw)


def _logits_at(*, hidden_states: Tensor, output_layer, output_weight, context, **_unused) -> Tensor:
    """GPTModel ``output_processor``: the output layer on the selected positions only.

    ``hidden_states`` ``[S, n, H]`` (after the final norm); ``context = (s_idx, b_idx, fp32)``:
    int64 ``[N]`` each, and whether the logits are fp32 in a lower-precision model (unrounded:
    :func:`~vigos_megatron.models.output_logits.fp32_output_logits`; else the model's dtype). Returns
    ``[N, V/tp]`` vocabulary-sharded logits (no TP gather); the gradient flows back into the
    selected hidden states only (the others get zeros).
    """
    s_idx, b_idx, fp32 = context
    h = hidden_states[s_idx, b_idx]  # [N, H]
    if fp32 and h.dtype != torch.float32:
        from vigos_megatron.models.output_logits import fp32_output_logits

        return fp32_output_logits(h, output_layer, output_weight)
    logits, _ = output_layer(h.unsqueeze(1), weight=output_weight, runtime_gather_output=False)
    return logits.squeeze(1)


def _hidden_at(*, hidden_states: Tensor, context, **_unused) -> Tensor:
    """GPTModel ``output_processor``: the final hidden states ``[N, H]`` at the selected positions (the
    output layer's input; a loss from hidden states applies the output weight itself, in fp32).
    ``context = (s_idx, b_idx, fp32)`` as for :func:`_logits_at` (``fp32`` does not apply)."""
    s_idx, b_idx, _ = context
    return hidden_states[s_idx, b_idx]


def language_forward(model, *, rows: RowInputs | None, position_ids: Tensor,
                     logit_positions: Tensor | None = None, hidden_only: bool = False,
                     fp32_logits: bool = False) -> Tensor:
    """This chunk's language model on the stream rows (``set_input_tensor`` already called off the first stage).

    Args:
        rows: :func:`embed_rows`' result on the first stage, else ``None``.
        position_ids: ``[3, n, S]`` from :func:`mrope_positions`.
        logit_positions: int64 ``[N]`` flat batch-first positions ``row * S + column`` whose
            logits the last stage computes; ``None``: all of them.
        hidden_only: with ``logit_positions``, return the final hidden states ``[N, H]`` there
            instead of the logits (the output layer is not applied).

    Returns ``[S, n, H]`` hidden states (not the last stage), ``[N, V/tp]`` logits
    (``logit_positions`` given), ``[N, H]`` (``hidden_only``) or ``[n, S, V/tp]`` (all positions).
    """
    kwargs = dict(rows.deepstack) if rows is not None else {}
    if model.post_process and logit_positions is not None:
        S = position_ids.shape[-1]
        kwargs.update(output_processor=_hidden_at if hidden_only else _logits_at,
                      output_processor_context=(logit_positions % S, torch.div(logit_positions, S, rounding_mode="floor"),
                                                fp32_logits))
    return model.language_model(input_ids=None, position_ids=position_ids, attention_mask=None,
                                decoder_input=rows.decoder_input if rows is not None else None, **kwargs)
