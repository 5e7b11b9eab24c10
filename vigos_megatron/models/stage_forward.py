"""A Qwen2.5-VL chunk's forward for the training stream: shared image features, logits at chosen positions.

megatron-bridge's ``Qwen25VLModel.forward`` does four things: embed the tokens, run the HF
vision tower on the pixels of every image row and scatter its output into the
``<|image_pad|>`` embeddings, compute the mrope position ids from ``input_ids`` and
``image_grid_thw``, and run the language model (megatron's ``GPTModel``), whose last stage
computes logits at every position. The training stream needs two things that forward cannot
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

from typing import Sequence

import torch
from torch import Tensor


def image_features(model, pixel_values: Tensor, grid_thw: Tensor) -> list[Tensor]:
    """The HF vision tower (with its merger) on the images ``grid_thw`` describes, in one call.

    Args:
        model: the first pipeline stage's ``Qwen25VLModel`` chunk (it owns ``visual``).
        pixel_values: ``[sum_i t_i*h_i*w_i, C*T*P*P]`` flattened patches of the images, concatenated.
        grid_thw: int64 ``[m, 3]``, one line per image.

    Returns one ``[t_i*h_i*w_i / merge**2, H]`` tensor per image, in order.
    """
    return list(model.get_image_features(pixel_values, grid_thw, return_dict=True).pooler_output)


def embed_rows(model, input_ids: Tensor, row_features: Sequence[Tensor]) -> Tensor:
    """Token embeddings ``[S, n, H]`` of ``input_ids`` ``[n, S]`` with image features scattered in.

    ``row_features``: one ``[tokens, H]`` tensor per image row, in row order; row ``r``'s
    ``<|image_pad|>`` embeddings are replaced by its features, in order (what
    ``Qwen25VLModel.forward`` does with ``masked_scatter``; the source keeps its autograd graph,
    so a trainable tower receives gradients).
    """
    emb = model.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, n, H]
    if not row_features:
        return emb
    emb = emb.transpose(1, 0).contiguous()  # [n, S, H]
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(emb)
    feats = torch.cat(list(row_features)).to(emb.device, emb.dtype)
    if feats.numel() != int(mask.sum()):
        raise ValueError(f"image features of {feats.shape[0]} tokens for {int(mask[..., 0].sum())} image placeholders")
    return emb.masked_scatter(mask, feats).transpose(1, 0)


def mrope_positions(model, input_ids: Tensor, grid_thw: Tensor | None) -> Tensor:
    """Qwen2.5-VL's mrope position ids ``[3, n, S]`` of right-padded rows ``input_ids`` ``[n, S]``.

    ``grid_thw``: int64 ``[image rows, 3]``, one line per image row in row order. Computed as
    ``Qwen25VLModel.forward`` computes them, on every pipeline stage.
    """
    cfg = model.config
    mm = torch.zeros_like(input_ids, dtype=torch.int)
    mm[input_ids == cfg.image_token_id] = 1
    mm[input_ids == cfg.video_token_id] = 2
    pos, _ = model.get_rope_index(input_ids, mm, grid_thw, None, second_per_grid_ts=None, attention_mask=None)
    return pos


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


def language_forward(model, *, decoder_input: Tensor | None, position_ids: Tensor,
                     logit_positions: Tensor | None = None, fp32_logits: bool = False) -> Tensor:
    """This chunk's language model on the stream rows (``set_input_tensor`` already called off the first stage).

    Args:
        decoder_input: ``[S, n, H]`` from :func:`embed_rows` on the first stage, else ``None``.
        position_ids: ``[3, n, S]`` from :func:`mrope_positions`.
        logit_positions: int64 ``[N]`` flat batch-first positions ``row * S + column`` whose
            logits the last stage computes; ``None``: all of them.

    Returns ``[S, n, H]`` hidden states (not the last stage), ``[N, V/tp]`` logits
    (``logit_positions`` given) or ``[n, S, V/tp]`` (all positions).
    """
    kwargs = {}
    if model.post_process and logit_positions is not None:
        S = position_ids.shape[-1]
        kwargs = {"output_processor": _logits_at,
                  "output_processor_context": (logit_positions % S, torch.div(logit_positions, S, rounding_mode="floor"),
                                              fp32_logits)}
    return model.language_model(input_ids=None, position_ids=position_ids, attention_mask=None,
                                decoder_input=decoder_input, **kwargs)
