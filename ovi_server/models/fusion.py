"""OviFusion: the video and audio towers run block by block with bidirectional cross-modal attention.

A diffusers `ModelMixin`/`ConfigMixin` (like diffusers' joint audio-video LTX2 transformer), so
diffusers' tooling applies unchanged: `set_attention_backend`, `apply_group_offloading`,
`enable_layerwise_casting`, `compile_repeated_blocks`. Keys equal `Ovi/model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.hooks.context_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from ovi_server.config import DiTConfig, dit_config
from ovi_server.models.loading import load_checkpoint, meta_device
from ovi_server.models.wan_dit import Tokens, WanDiT
from ovi_server.placement import Placement

# The layer types whose weights diffusers' layerwise casting stores in low precision: our own copy of
# diffusers' private `hooks._common._GO_LC_SUPPORTED_PYTORCH_LAYERS` (0.42), so an upgrade cannot break the
# import; tests/models/test_fusion.py checks it names what `enable_layerwise_casting` stores in fp8.
CASTABLE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.Embedding,
)  # fmt: skip

# Called after each executed fusion block with (index, video tokens, audio tokens); golden checks use it.
BlockObserver = Callable[[int, Tokens, Tokens], None]


class OviFusion(ModelMixin, ConfigMixin):
    _no_split_modules = ["WanBlock"]
    _repeated_blocks = ["WanBlock"]
    # Kept in the compute dtype when Linear weights are stored in fp8 (enable_layerwise_casting).
    _skip_layerwise_casting_patterns = [
        "patch_embedding",
        "time_embedding",
        "time_projection",
        "norm",
        "head",
    ]

    # Sequence parallelism (diffusers' context parallelism, applied by engine/parallel.py): each tower's
    # tokens, RoPE tables and per-token time embeddings are split along the token dimension where they
    # enter the blocks (`TokenShard`), and the head outputs are gathered back. Text contexts stay whole.
    _cp_plan = {
        f"{tower}.shard": {
            "x": ContextParallelInput(split_dim=1, expected_dims=3),  # [B, L, dim]
            "rope_freqs": ContextParallelInput(split_dim=1, expected_dims=4),  # [B, L, 1, D/2]
            "rope_cos": ContextParallelInput(split_dim=1, expected_dims=4),
            "rope_sin": ContextParallelInput(split_dim=1, expected_dims=4),
            # only given when every token has its own t (i2v); None (skipped by the hook) otherwise, so no
            # tensor of another rank reaches the hook's rank check, whose warning path calls
            # `logger.warning_once`, which diffusers 0.42.1's logger lacks
            "token_e": ContextParallelInput(split_dim=1, expected_dims=3),  # [B, L, dim]
            "token_e0": ContextParallelInput(split_dim=1, expected_dims=4),  # [B, L, 6, dim]
        }
        for tower in ("video_model", "audio_model")
    } | {
        "video_model.head": ContextParallelOutput(gather_dim=1, expected_dims=3),  # [B, L, 4 * 48]
        "audio_model.head": ContextParallelOutput(gather_dim=1, expected_dims=3),  # [B, L, 20]
    }
    sequence_parallel_degree = 1  # tokens are padded to a multiple of it; set by engine/parallel.py

    @register_to_config
    def __init__(self, video: dict[str, Any], audio: dict[str, Any]):
        super().__init__()
        video_cfg, audio_cfg = dit_config(video, "video tower"), dit_config(audio, "audio tower")
        if video_cfg.num_layers != audio_cfg.num_layers:
            raise ValueError("the video and audio towers must have the same number of blocks")
        self.video_model = WanDiT(video_cfg)
        self.audio_model = WanDiT(audio_cfg)

    @classmethod
    def from_configs(cls, video: DiTConfig, audio: DiTConfig) -> OviFusion:
        return cls(video=_jsonable(video), audio=_jsonable(audio))

    @property
    def num_blocks(self) -> int:
        return len(self.video_model.blocks)

    def forward(
        self,
        video: Sequence[Tensor],
        audio: Sequence[Tensor],
        t: Tensor,
        video_context: Sequence[Tensor],
        audio_context: Sequence[Tensor],
        video_seq_len: int | None = None,
        audio_seq_len: int | None = None,
        first_frame_is_clean: bool = False,
        slg_layer: int = 0,
        slg_items: Sequence[bool] | None = None,
        observer: BlockObserver | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Velocity predictions for a batch of (video, audio) latents.

        Args:
            video: per item [48, F, H, W] latents; audio: per item [L, 20] latents.
            t: [B] timesteps, shared by both towers.
            video_context / audio_context: per item text embeddings [L_i, text_dim].
            first_frame_is_clean: i2v; the first latent frame's video tokens get t = 0.
            slg_layer: skip-layer guidance; block `slg_layer` of both towers is skipped when > 0.
            slg_items: per item, whether it skips block `slg_layer` (True) or runs it (False); None: every
                item skips it. Batched guidance ([positive, negative]) passes (False, True).
        Returns:
            per item video [48, F, H, W] and audio [L, 20] predictions.
        """
        assert slg_items is None or len(slg_items) == len(video), "one slg_items entry per batch item"
        degree = self.sequence_parallel_degree
        v = self.video_model.embed(video, t, video_context, video_seq_len, first_frame_is_clean, degree)
        a = self.audio_model.embed(audio, t, audio_context, audio_seq_len, multiple_of=degree)
        # under sequence parallelism each rank keeps its share of both token streams from here on
        # (split hooks of `_cp_plan`); the heads gather them back
        v, a = self.video_model.shard_tokens(v), self.audio_model.shard_tokens(a)
        for i in range(self.num_blocks):
            if slg_layer > 0 and i == slg_layer:
                if slg_items is None or all(slg_items):
                    continue
                v, a = self._fusion_block_for(i, v, a, [b for b, skip in enumerate(slg_items) if not skip])
            else:
                v, a = self.fusion_block(i, v, a)
            if observer is not None:
                observer(i, v, a)
        return self.video_model.unembed(v), self.audio_model.unembed(a)

    def _fusion_block_for(self, i: int, v: Tokens, a: Tokens, items: list[int]) -> tuple[Tokens, Tokens]:
        """Fusion block i on the batch items `items` only; the other items pass through unchanged.

        The block only updates the residual streams `x`, so the result is the input with those items'
        rows of `x` replaced by the block's output on the sliced tokens.
        """
        if len(items) == v.x.shape[0]:
            return self.fusion_block(i, v, a)
        v_part, a_part = self.fusion_block(i, v.select_items(items), a.select_items(items))
        index = torch.tensor(items, dtype=torch.int64, device=v.x.device)
        return (
            _replace_x(v, v.x.index_copy(0, index, v_part.x)),
            _replace_x(a, a.x.index_copy(0, index, a_part.x)),
        )

    def fusion_block(self, i: int, v: Tokens, a: Tokens) -> tuple[Tokens, Tokens]:
        """One fusion block: both self-attentions, then audio attends to the updated video tokens and
        video attends to the audio tokens from before audio's cross-attention (the reference's order)."""
        video_block, audio_block = self.video_model.blocks[i], self.audio_model.blocks[i]
        # 1. self-attention, audio then video
        a = _replace_x(a, audio_block(a, "self"))
        v = _replace_x(v, video_block(v, "self"))
        # 2. text + cross-modal attention and FFN; video sees audio as it was before this step
        a_next = _replace_x(a, audio_block(a, "cross", target=v))
        v = _replace_x(v, video_block(v, "cross", target=a))
        return v, a_next


def _replace_x(tokens: Tokens, x: Tensor) -> Tokens:
    return dataclasses.replace(tokens, x=x)


def _jsonable(cfg: DiTConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def build_fusion(video: DiTConfig, audio: DiTConfig) -> OviFusion:
    """The model on the meta device: no memory until weights are assigned."""
    with meta_device():
        return OviFusion.from_configs(video, audio)


def load_fusion(
    path: str | Path, video: DiTConfig, audio: DiTConfig, placement: Placement, keep_fp8: bool = False
) -> OviFusion:
    """Loads `Ovi/model*.safetensors` (bf16, or fp8 e4m3fn) strictly into a meta-built model.

    fp8 tensors are upcast to the placement dtype, unless `keep_fp8`: then the Linear/Conv weights that
    the file stores in fp8 stay fp8 in memory and are upcast one layer at a time (models/fp8.py);
    biases and norms keep the file's dtype (bf16 in the official fp8 file).
    """
    model = build_fusion(video, audio)
    kept = {n for n in layerwise_cast_params(model) if n.endswith(".weight")} if keep_fp8 else False
    load_checkpoint(model, path, placement, what="fusion model", keep_fp8=kept)
    if keep_fp8:
        from ovi_server.models.fp8 import apply_fp8_weights

        apply_fp8_weights(model, placement.dtype)
    return model


def layerwise_cast_params(model: OviFusion) -> set[str]:
    """Names of the parameters `enable_layerwise_casting` stores in low precision (same rule as diffusers)."""
    names = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, CASTABLE_LAYERS):
            continue
        if any(re.search(p, module_name) for p in model._skip_layerwise_casting_patterns):
            continue
        names.update(f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return names
