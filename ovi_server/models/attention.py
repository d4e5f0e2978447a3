"""The one attention call site. Kernels are chosen by diffusers' attention dispatcher.

`OviFusion.set_attention_backend(name)` (from diffusers' ModelMixin) sets the dispatcher's active
backend; every call here passes `backend=None` so that setting applies, and diffusers' hooks and
parallel tooling see one function to wrap.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import Tensor


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
    """Softmax attention, non-causal, scale 1/sqrt(head_dim).

    Args:
        q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
        k_lens: per batch item, how many leading keys are real (the rest are padding); None: all.
    Returns:
        [B, Lq, H, D]; padded query rows get ordinary outputs, as in the reference.
    """
    mask = None if k_lens is None else key_padding_mask(k_lens, k.shape[1], k.device)
    return dispatch_attention_fn(q, k, v, attn_mask=mask)
