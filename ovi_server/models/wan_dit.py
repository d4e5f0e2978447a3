"""One Wan2.2-style DiT tower, used twice by Ovi: video (ti2v, patch 1x2x2) and audio (t2a, patch 1).

Parameter names equal the official checkpoint's (`video_model.*` / `audio_model.*` in
`Ovi/model.safetensors`), including the cross-modal projections Ovi adds to every block's
cross-attention (`k_fusion`, `v_fusion`, `pre_attn_norm_fusion`, `norm_k_fusion`).

Precision mirrors the reference (character-ai/Ovi `ovi/modules/model.py`) when the weights are bf16:
LayerNorms and RMSNorms compute in float32 and return the input dtype (the reference's bf16 autocast
runs `layer_norm`, `pow` and `rsqrt` in float32), the timestep sinusoid is float64,
and RoPE rotates in float32 with float64-built tables (the reference rotates in float64 and rounds to
bf16; float32 keeps that within bf16 rounding while avoiding float64 on the GPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from torch import Tensor, nn

from ovi_server.config import DiTConfig
from ovi_server.models.attention import FusionCrossAttnProcessor, SelfAttnProcessor, key_padding_mask


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and rounded to the input dtype once.

    The reference's `WanRMSNorm` runs under CUDA autocast in bf16, whose policy computes `pow` and
    `rsqrt` in float32, so its normalised q and k are rounded to bf16 once (then multiplied by the
    weight in bf16; here the weight is applied before the one rounding). Computed in bf16 instead, the
    per-row scale rsqrt(mean(x^2)) is itself rounded, which scales all of a token's attention logits
    at once: that made our bf16 forward's video output drift ~2% further from float32 than the
    reference's (benchmarks/drift.py).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class ChannelLastConv1d(nn.Conv1d):
    """Conv1d on [B, L, C] tensors (the audio tower's tokens are channel-last)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ConvMLP(nn.Module):
    """SwiGLU with k=7 convolutions: w2(silu(w1 x) * w3 x); hidden = 256*ceil(int(2*4*dim/3)/256)."""

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 7, multiple_of: int = 256):
        super().__init__()
        hidden = int(2 * hidden_dim / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        pad = kernel_size // 2
        self.w1 = ChannelLastConv1d(dim, hidden, kernel_size, padding=pad, bias=False)
        self.w2 = ChannelLastConv1d(hidden, dim, kernel_size, padding=pad, bias=False)
        self.w3 = ChannelLastConv1d(dim, hidden, kernel_size, padding=pad, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Modulation(nn.Module):
    """Learned per-block offsets added to the projected time embedding (key `modulation.modulation`)."""

    def __init__(self, dim: int, num: int):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(1, num, dim))

    def forward(self, e0: Tensor) -> Tensor:
        return self.modulation.to(e0.dtype) + e0  # [B, Lt, num, dim]


# ---------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------


def rope_frequencies(num_pairs_dim: int, scale: float = 1.0, theta: float = 10000.0) -> Tensor:
    """omega_k = scale / theta^(2k/dim) for k < dim/2, float64 (reference: `rope_params`)."""
    exponents = torch.arange(0, num_pairs_dim, 2, dtype=torch.float64) / num_pairs_dim
    return scale / torch.pow(theta, exponents)


@dataclass(frozen=True)
class Rope:
    """Rotations [B, L, 1, head_dim/2] as complex64 for one token layout; padded tokens get angle 0."""

    freqs: Tensor
    cos: Tensor  # the same rotations as real tables, for compiled graphs
    sin: Tensor

    def apply(self, x: Tensor) -> Tensor:
        """Rotates consecutive pairs (x[2k], x[2k+1]) of every head of x [B, L, H, D].

        One complex multiply in float32 (the reference multiplies in complex128 and rounds to the
        model dtype): 14x faster on a CPU than rotating with separate cos/sin products.
        """
        pairs = x.float().unflatten(-1, (-1, 2))
        if torch.compiler.is_compiling():
            # inductor generates no code for complex ops; written out in reals it fuses into one kernel
            x0, x1 = pairs[..., 0], pairs[..., 1]
            rotated = (x0 * self.cos - x1 * self.sin, x0 * self.sin + x1 * self.cos)
            return torch.stack(rotated, dim=-1).flatten(-2).to(x.dtype)
        rotated = torch.view_as_complex(pairs.contiguous()) * self.freqs
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)

    def select_items(self, index: Tensor) -> Rope:
        """The rotations of the batch items `index` [n] (int64, on the tables' device)."""
        return Rope(*(u.index_select(0, index) for u in (self.freqs, self.cos, self.sin)))


def _video_angles(head_dim: int, f: int, h: int, w: int) -> Tensor:
    """Angles [f*h*w, head_dim/2]: frame, row and column frequencies side by side (3-D RoPE)."""
    part = head_dim // 6
    omega_f = rope_frequencies(head_dim - 4 * part)
    omega_hw = rope_frequencies(2 * part)
    grid_f = torch.arange(f, dtype=torch.float64)[:, None, None, None] * omega_f
    grid_h = torch.arange(h, dtype=torch.float64)[None, :, None, None] * omega_hw
    grid_w = torch.arange(w, dtype=torch.float64)[None, None, :, None] * omega_hw
    angles = torch.cat(
        [grid_f.expand(f, h, w, -1), grid_h.expand(f, h, w, -1), grid_w.expand(f, h, w, -1)], dim=-1
    )
    return angles.reshape(f * h * w, -1)


def _audio_angles(head_dim: int, length: int, scale: float) -> Tensor:
    """Angles [length, head_dim/2]: scaled 1-D RoPE on the first (d - 4*(d//6))/2 pairs, the rest unrotated."""
    omega = rope_frequencies(head_dim - 4 * (head_dim // 6), scale)
    angles = torch.zeros(length, head_dim // 2, dtype=torch.float64)
    angles[:, : omega.numel()] = torch.arange(length, dtype=torch.float64)[:, None] * omega
    return angles


@lru_cache(maxsize=32)
def _rope_tables(
    head_dim: int, grids: tuple[tuple[int, ...], ...], seq_len: int, scale: float, device: torch.device
) -> Rope:
    angles = torch.zeros(len(grids), seq_len, head_dim // 2, dtype=torch.float64)
    for b, grid in enumerate(grids):
        a = _video_angles(head_dim, *grid) if len(grid) == 3 else _audio_angles(head_dim, grid[0], scale)
        angles[b, : a.shape[0]] = a
    angles = angles[:, :, None, :]
    freqs = torch.polar(torch.ones_like(angles), angles)  # complex128, built once per layout
    return Rope(
        freqs.to(torch.complex64).to(device), angles.cos().float().to(device), angles.sin().float().to(device)
    )


def timestep_sinusoid(freq_dim: int, t: Tensor) -> Tensor:
    """[cos(t*w), sin(t*w)] with w_k = 10000^(-k/half), in float64 as the reference."""
    half = freq_dim // 2
    t = t.to(torch.float64)
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t[..., None] * omega
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


# ---------------------------------------------------------------------------------------------
# Tokens: what one tower's blocks work on
# ---------------------------------------------------------------------------------------------


@dataclass
class Tokens:
    """One tower's token stream and everything its blocks need, laid out once per forward."""

    x: Tensor  # [B, L, dim] residual stream
    e: Tensor  # [B, Lt, dim] time embedding (Lt = 1 when every token shares t, else L)
    e0: Tensor  # [B, Lt, 6, dim] projected time embedding
    context: Tensor  # [B, text_len, dim] embedded text
    seq_lens: tuple[int, ...]  # real tokens per batch item; the rest is zero padding
    grids: tuple[tuple[int, ...], ...]  # (F, H, W) patches per item (video) or (L,) (audio)
    rope: Rope
    # [B, 1, 1, L] True = real key, over the whole sequence (also when x holds one rank's share:
    # Ulysses attention sees every key); None when no key is padding
    key_mask: Tensor | None = None

    def select_items(self, items: Sequence[int]) -> Tokens:
        """The tokens of batch items `items` only: every per-item field (the residual stream, time
        embeddings, text, RoPE tables, key mask, lengths and grids) is sliced alike."""
        index = torch.tensor(list(items), dtype=torch.int64, device=self.x.device)
        pick = lambda u: u.index_select(0, index)  # noqa: E731
        return Tokens(
            x=pick(self.x),
            e=pick(self.e),
            e0=pick(self.e0),
            context=pick(self.context),
            seq_lens=tuple(self.seq_lens[b] for b in items),
            grids=tuple(self.grids[b] for b in items),
            rope=self.rope.select_items(index),
            key_mask=None if self.key_mask is None else pick(self.key_mask),
        )


# ---------------------------------------------------------------------------------------------
# Attention modules and the block
# ---------------------------------------------------------------------------------------------


class SelfAttention(nn.Module, AttentionModuleMixin):
    """q, k, v, o projections with RMS-normed q and k; the processor (models/attention.py) runs it."""

    _default_processor_cls = SelfAttnProcessor
    _available_processors = [SelfAttnProcessor]
    _supports_qkv_fusion = False  # the checkpoint keeps q, k and v apart

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.set_processor(self._default_processor_cls())

    def heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))  # [B, L, H, D]

    def forward(self, x: Tensor, rope: Rope, key_mask: Tensor | None) -> Tensor:
        return self.processor(self, x, rope, key_mask)


class FusionCrossAttention(SelfAttention):
    """Text cross-attention plus Ovi's cross-modal attention to the other tower's tokens, summed before `o`."""

    _default_processor_cls = FusionCrossAttnProcessor
    _available_processors = [FusionCrossAttnProcessor]

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.k_fusion = nn.Linear(dim, dim)
        self.v_fusion = nn.Linear(dim, dim)
        self.pre_attn_norm_fusion = LayerNorm(dim, eps=1e-6, elementwise_affine=True)
        self.norm_k_fusion = RMSNorm(dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, own: Tokens, target: Tokens) -> Tensor:  # type: ignore[override]
        return self.processor(self, x, own, target)


class WanBlock(nn.Module):
    """One DiT block. Ovi runs it in two phases so the two towers can exchange tokens in between:
    `forward(tokens, phase="self")` (modulated self-attention) and `forward(tokens, "cross", target)`
    (text + cross-modal attention, then the modulated FFN). Both go through `forward` so diffusers'
    module hooks (group offloading, layerwise casting) see every call.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = (
            LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        )
        self.cross_attn = FusionCrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = Modulation(dim, 6)

    def forward(self, tokens: Tokens, phase: str, target: Tokens | None = None) -> Tensor:
        shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = self.modulation(tokens.e0).unbind(2)
        x = tokens.x
        if phase == "self":
            y = self.self_attn(self.norm1(x) * (1 + scale_sa) + shift_sa, tokens.rope, tokens.key_mask)
            return x + y * gate_sa
        assert phase == "cross" and target is not None
        x = x + self.cross_attn(self.norm3(x), tokens, target)
        y = self.ffn(self.norm2(x) * (1 + scale_ffn) + shift_ffn)
        return x + y * gate_ffn


class TokenShard(nn.Module):
    """The point where a tower's token stream is split across sequence-parallel ranks.

    An identity without parameters (checkpoint keys are unchanged): `OviFusion._cp_plan` puts diffusers'
    context-parallel split hook on it, which hands `forward` this rank's share of every tensor along the
    token dimension. Returns the tensors it was given, `None`s left out: diffusers' hook skips `None`
    inputs but accepts only tensors as outputs.
    """

    def forward(
        self,
        x: Tensor,
        rope_freqs: Tensor,
        rope_cos: Tensor,
        rope_sin: Tensor,
        token_e: Tensor | None = None,
        token_e0: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        return tuple(u for u in (x, rope_freqs, rope_cos, rope_sin, token_e, token_e0) if u is not None)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (self.modulation.to(e.dtype)[:, None] + e[:, :, None]).unbind(2)  # [B, Lt, dim] each
        return self.head(self.norm(x) * (1 + scale) + shift)


class WanDiT(nn.Module):
    """Embeddings, blocks and head of one tower; the block loop itself lives in OviFusion."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.is_audio:
            if tuple(cfg.patch_size) != (1,):
                raise ValueError(f"audio tower takes patch_size (1,), got {cfg.patch_size}")
            # hard-wired to MMAudio latents in the reference: conv k7, SiLU, ConvMLP
            self.patch_embedding = nn.Sequential(
                ChannelLastConv1d(cfg.in_dim, cfg.dim, kernel_size=7, padding=3),
                nn.SiLU(),
                ConvMLP(cfg.dim, cfg.dim * 4, kernel_size=7),
            )
        else:
            self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.shard = TokenShard()
        self.head = Head(cfg)

    @property
    def compute_dtype(self) -> torch.dtype:
        # A bare Parameter: never stored in fp8 by layerwise casting, so it tells the compute dtype.
        return self.head.modulation.dtype

    def embed(
        self,
        latents: Sequence[Tensor],
        t: Tensor,
        context: Sequence[Tensor],
        seq_len: int | None = None,
        first_frame_is_clean: bool = False,
        multiple_of: int = 1,
    ) -> Tokens:
        """Lays out tokens for the blocks.

        Args:
            latents: per item, video [C, F, H, W] or audio [L, C].
            t: [B] timesteps (the reference feeds int64 values; any dtype works).
            context: per item, text embeddings [L_i, text_dim], zero-padded here to text_len.
            seq_len: pad every item's tokens to this length (default: the longest item).
            first_frame_is_clean: i2v; tokens of the first latent frame get t = 0.
            multiple_of: round the padded length up to a multiple of this (the sequence-parallel degree);
                the extra tokens are padding, masked as keys and dropped from the output.
        """
        cfg = self.cfg
        dtype = self.compute_dtype
        if cfg.is_audio:
            embedded = [self.patch_embedding(u[None].to(dtype)) for u in latents]  # [1, L, dim]
            grids = tuple((u.shape[1],) for u in embedded)
        else:
            embedded = [self.patch_embedding(u[None].to(dtype)) for u in latents]  # [1, dim, F, H', W']
            grids = tuple(tuple(u.shape[2:]) for u in embedded)
            embedded = [u.flatten(2).transpose(1, 2) for u in embedded]  # [1, L, dim]
        seq_lens = tuple(u.shape[1] for u in embedded)
        seq_len = seq_len or max(seq_lens)
        if max(seq_lens) > seq_len:
            raise ValueError(f"{max(seq_lens)} tokens exceed seq_len {seq_len}")
        seq_len = -(-seq_len // multiple_of) * multiple_of
        x = torch.cat([F.pad(u, (0, 0, 0, seq_len - u.shape[1])) for u in embedded])  # [B, L, dim]

        if first_frame_is_clean:
            # per-token timesteps: 0 on the first latent frame's tokens, t elsewhere (padding included)
            first = torch.tensor([math.prod(g[1:]) for g in grids], device=x.device)
            is_first = torch.arange(seq_len, device=x.device)[None, :] < first[:, None]
            t_tokens = torch.where(is_first, torch.zeros_like(t)[:, None], t[:, None])  # [B, L]
        else:
            t_tokens = t[:, None]  # [B, 1]: every token shares t, computed once
        e = self.time_embedding(
            timestep_sinusoid(cfg.freq_dim, t_tokens.to(x.device)).to(dtype)
        )  # [B, Lt, dim]
        e0 = self.time_projection(e).unflatten(2, (6, cfg.dim))  # [B, Lt, 6, dim]

        padded = [F.pad(c.to(dtype), (0, 0, 0, cfg.text_len - c.shape[0])) for c in context]
        text = self.text_embedding(torch.stack(padded))  # [B, text_len, dim]
        rope = _rope_tables(cfg.head_dim, grids, seq_len, cfg.temporal_rope_scaling_factor, x.device)
        key_mask = key_padding_mask(seq_lens, seq_len, x.device)
        return Tokens(x, e, e0, text, seq_lens, grids, rope, key_mask)

    def shard_tokens(self, tokens: Tokens) -> Tokens:
        """This rank's share of the tokens under sequence parallelism (see TokenShard); else the same."""
        per_token = tokens.e.shape[1] == tokens.x.shape[1] > 1  # i2v: one time embedding per token
        rope = tokens.rope
        token_e, token_e0 = (tokens.e, tokens.e0) if per_token else (None, None)
        split = self.shard(tokens.x, rope.freqs, rope.cos, rope.sin, token_e, token_e0)
        x, freqs, cos, sin = split[:4]
        e, e0 = split[4:] if per_token else (tokens.e, tokens.e0)
        return dataclasses.replace(tokens, x=x, e=e, e0=e0, rope=Rope(freqs, cos, sin))

    def unembed(self, tokens: Tokens) -> list[Tensor]:
        """Head and unpatchify: per item video [C, F, H, W] or audio [L, C]."""
        out = self.head(tokens.x, tokens.e)  # [B, L, prod(patch) * C]
        if self.cfg.is_audio:
            return [u[:n] for u, (n,) in zip(out, tokens.grids, strict=True)]
        c = self.cfg.out_dim
        pf, ph, pw = self.cfg.patch_size
        videos = []
        for u, (f, h, w) in zip(out, tokens.grids, strict=True):
            u = u[: f * h * w].view(f, h, w, pf, ph, pw, c)
            videos.append(torch.einsum("fhwpqrc->cfphqwr", u).reshape(c, f * pf, h * ph, w * pw))
        return videos
