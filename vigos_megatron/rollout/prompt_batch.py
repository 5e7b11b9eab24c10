"""One generation round: left-padded prompts, mrope positions for every cache column, padding masks.

Layout of a round of ``B`` prompts with lengths ``L_b`` (``P = max L_b``) that may generate up
to ``N`` new tokens: cache column ``c`` in ``[0, T)``, ``T = P + N - 1`` (the last generated token
is never fed back). Prompt ``b`` occupies columns ``[P - L_b, P)`` (left padding), so the last
prompt token of every row sits at column ``P - 1`` and the logits of the prefill's last column are
every row's first next-token distribution. The token generated at step ``t`` (``t = 0`` first)
is fed at column ``P + t``.

mrope positions (``[3, B, T]``, int64; temporal / height / width rows): the prompt part comes from
Qwen2.5-VL's ``get_rope_index`` on the unpadded prompt (vision tokens get 3-D positions, text
1-D), exactly as Hugging Face computes it; a generated token at column ``c >= P`` gets
``max(prompt positions of b) + 1 + (c - P)`` on all three rows, i.e. HF's
``cache_position + rope_delta`` with ``rope_delta = max + 1 - L_b`` carried from the prefill.
Padding columns get position 0 and are masked out of attention (``key_pad[b, c]`` True for
``c < P - L_b``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptRound:
    """Device tensors of one round (see the module docstring for the layout)."""

    #: int64 [B, P] prompt ids, left-padded with the pad id
    input_ids: torch.Tensor
    #: unpadded prompt lengths L_b
    lengths: list[int]
    #: int64 [3, B, T] mrope positions of every cache column
    positions: torch.Tensor
    #: bool [B, T], True on padding columns (never attended to)
    key_pad: torch.Tensor
    #: int64 [B] global sample index of each row (keys the sampling noise)
    sample_ids: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def max_columns(self) -> int:
        return self.positions.shape[-1]


def prompt_mrope_positions(model, input_ids: torch.Tensor, image_grid_thw) -> torch.Tensor:
    """mrope positions ``[3, L]`` (int64) of one unpadded prompt ``input_ids`` ``[L]``.

    ``model``: a first-or-later-stage chunk; its family's position ids
    (:meth:`~vigos_megatron.models.family.ModelFamily.rope_index`, what Bridge's forward computes).
    """
    from vigos_megatron.models.family import family_of

    return family_of(model).rope_index(model, input_ids[None], image_grid_thw)[:, 0].to(torch.int64)


@dataclass
class DeepstackRows:
    """The deepstack inputs of a round's prompts (Qwen3-VL; see :mod:`vigos_megatron.models.qwen3_vl`).

    ``mask`` bool ``[B, P]``: the image tokens of the left-padded prompts; ``feats``: one
    ``[mask.sum(), H]`` tensor per deepstack layer ``k``, in the mask's row-major order, added
    to the output of language-model layer ``k`` at those positions.
    """

    mask: torch.Tensor
    feats: list

    def _feats(self, rows, columns) -> tuple[torch.Tensor, list]:
        """``(mask[rows, columns], feats)`` with the features of that block's image tokens, in its mask's
        row-major order (``feats`` rows are numbered in the whole mask's row-major order)."""
        index = torch.cumsum(self.mask.flatten(), 0).view_as(self.mask) - 1
        m = self.mask[rows][:, columns]
        idx = index[rows][:, columns][m]
        return m, [f[idx] for f in self.feats]

    def block(self, rows: tuple[int, int], columns: tuple[int, int]) -> tuple[torch.Tensor, list]:
        """``(mask [b, s], feats)`` of the rows/columns block, features in the block mask's row-major order."""
        return self._feats(slice(*rows), slice(*columns))

    def model_kwargs(self, rows, end: int) -> dict:
        """The language model's deepstack arguments for round rows ``rows`` (a slice or an index
        tensor) over columns ``[0, end)`` (columns past the prompt hold generated text: no image token)."""
        mask, feats = self._feats(rows, slice(None))
        full = torch.zeros((mask.shape[0], end), dtype=torch.bool, device=mask.device)
        full[:, : mask.shape[1]] = mask
        return {"visual_pos_masks": full, "deepstack_visual_embeds": feats}


def build_round(prompt_ids: list[torch.Tensor], prompt_positions: list[torch.Tensor], sample_ids: list[int], *,
                max_new_tokens: int, pad_token_id: int, device) -> PromptRound:
    """Left-pad ``prompt_ids`` (int64 ``[L_b]`` each) and lay out positions and masks for ``T`` columns.

    ``prompt_positions``: the matching ``[3, L_b]`` mrope positions (:func:`prompt_mrope_positions`).
    """
    b = len(prompt_ids)
    lengths = [int(t.numel()) for t in prompt_ids]
    p = max(lengths)
    t_cols = p + max_new_tokens - 1
    ids = torch.full((b, p), pad_token_id, dtype=torch.int64)
    pos = torch.zeros((3, b, t_cols), dtype=torch.int64)
    key_pad = torch.zeros((b, t_cols), dtype=torch.bool)
    gen = torch.arange(t_cols - p, dtype=torch.int64)
    for i, (t, pp, n) in enumerate(zip(prompt_ids, prompt_positions, lengths)):
        ids[i, p - n :] = t.to(torch.int64).cpu()
        pos[:, i, p - n : p] = pp.cpu()
        pos[:, i, p:] = (int(pp.max()) + 1 + gen)[None]
        key_pad[i, : p - n] = True
    return PromptRound(
        input_ids=ids.to(device),
        lengths=lengths,
        positions=pos.to(device),
        key_pad=key_pad.to(device),
        sample_ids=torch.tensor(sample_ids, dtype=torch.int64, device=device),
    )


def causal_padding_mask(key_pad: torch.Tensor, query_start: int, query_end: int) -> torch.Tensor:
    """Attention mask for queries at columns ``[query_start, query_end)`` over keys ``[0, query_end)``.

    ``key_pad``: bool ``[B, >= query_end]``. Returns bool ``[B, 1, sq, sk]``, True = masked
    (megatron's local attention fills those scores with -10000 before the softmax): a key is masked
    if it is padding or lies after the query. Padding queries see only padding (their outputs are
    never used).
    """
    dev = key_pad.device
    q = torch.arange(query_start, query_end, device=dev)
    k = torch.arange(query_end, device=dev)
    future = k[None, :] > q[:, None]  # [sq, sk]
    return future[None, None] | key_pad[:, None, None, :query_end]
