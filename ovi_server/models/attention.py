"""Attention: the processors that hand q, k, v to diffusers' attention dispatcher.

`SelfAttention` and `FusionCrossAttention` (models/wan_dit.py) are diffusers `AttentionModuleMixin`
modules; their processors below call `dispatch_attention_fn(..., backend=..., parallel_config=...)`.
`OviFusion.set_attention_backend(name)` therefore sets the kernel of this model only, and
`OviFusion.enable_parallelism(...)` (engine/parallel.py) hands every processor the context-parallel
config, which turns self and audio<->video attention into Ulysses attention. Text cross-attention
always runs without it: the text context is replicated on every rank, as in diffusers' Wan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import Tensor

if TYPE_CHECKING:
    from ovi_server.models.wan_dit import FusionCrossAttention, Rope, SelfAttention, Tokens


def key_padding_mask(k_lens: Sequence[int], num_keys: int, device: torch.device) -> Tensor | None:
    """Boolean mask [B, 1, 1, Lk] (True = attend) hiding keys at positions >= k_lens[b]; None if none are hidden.

    k_lens are plain ints (known when tokens are laid out), so building the mask needs no host sync.
    """
    if all(n >= num_keys for n in k_lens):
        return None
    positions = torch.arange(num_keys, device=device)
    lens = torch.tensor(list(k_lens), device=device)
    return (positions[None, :] < lens[:, None])[:, None, None, :]


def attention(q: Tensor, k: Tensor, v: Tensor, k_lens: Sequence[int] | None = None) -> Tensor:
    """Softmax attention, non-causal, scale 1/sqrt(head_dim), with the dispatcher's active backend.

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
        k_lens: per batch item, how many leading keys are real (the rest are padding); None: all.
    Returns:
        [B, Lq, H, D]; padded query rows get ordinary outputs, as in the reference.
    """
    mask = None if k_lens is None else key_padding_mask(k_lens, k.shape[1], k.device)
    return dispatch_attention_fn(q, k, v, attn_mask=mask)


class SelfAttnProcessor:
    """Self-attention of one tower: RoPE on q and k, padded keys masked.

    Under sequence parallelism x holds this rank's share of the tokens and `_parallel_config` makes
    the dispatcher exchange heads for tokens (Ulysses all-to-all) around the kernel; the key mask
    covers the whole sequence, which is what each rank sees inside the kernel.
    """

    _attention_backend = None  # set by OviFusion.set_attention_backend
    _parallel_config = None  # set by OviFusion.enable_parallelism

    def __call__(self, attn: SelfAttention, x: Tensor, rope: Rope, key_mask: Tensor | None) -> Tensor:
        q = rope.apply(attn.heads(attn.norm_q(attn.q(x))))
        k = rope.apply(attn.heads(attn.norm_k(attn.k(x))))
        v = attn.heads(attn.v(x))
        out = dispatch_attention_fn(
            q,
            k,
            v,
            attn_mask=key_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return attn.o(out.flatten(2))


class FusionCrossAttnProcessor:
    """Text cross-attention plus Ovi's cross-modal attention to the other tower, summed before `o`."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: FusionCrossAttention, x: Tensor, own: Tokens, target: Tokens) -> Tensor:
        q = attn.heads(attn.norm_q(attn.q(x)))
        # 1. text: no RoPE, no key mask (zero-padded context rows are attended, as in the reference).
        # The context is whole on every rank, so this attention is local: no parallel config.
        k_text = attn.heads(attn.norm_k(attn.k(own.context)))
        v_text = attn.heads(attn.v(own.context))
        out = dispatch_attention_fn(q, k_text, v_text, backend=self._attention_backend, parallel_config=None)
        # 2. cross-modal: RoPE on both sides with each tower's own positions, target padding masked;
        # both streams are split along their tokens, so this one is Ulysses attention too
        y = attn.pre_attn_norm_fusion(target.x)
        k_other = target.rope.apply(attn.heads(attn.norm_k_fusion(attn.k_fusion(y))))
        v_other = attn.heads(attn.v_fusion(y))
        out = out + dispatch_attention_fn(
            own.rope.apply(q),
            k_other,
            v_other,
            attn_mask=target.key_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return attn.o(out.flatten(2))
