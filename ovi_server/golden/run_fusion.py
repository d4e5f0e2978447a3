"""Golden `fusion`: one OviFusion forward, with its intermediates, against the reference."""

from __future__ import annotations

import torch

from ovi_server.config import dit_config
from ovi_server.engine.device import CPU_FP32, Placement
from ovi_server.engine.parallel import ParallelGroup, gather_tokens
from ovi_server.golden.cases import CaseResult, Comparison, GoldenCase
from ovi_server.models.fusion import load_fusion
from ovi_server.models.wan_dit import Tokens


def run_case(
    case: GoldenCase, placement: Placement = CPU_FP32, parallel: ParallelGroup | None = None
) -> CaseResult:
    """The case through our loader and model on `placement` (CPU float32 by default, as the reference ran).

    With `parallel` (every rank runs this), the model runs sequence parallel; block outputs are
    gathered from the ranks before they are compared."""
    cfg = case.config
    video_cfg = dit_config(cfg["video"], f"{case.name}:video")
    audio_cfg = dit_config(cfg["audio"], f"{case.name}:audio")
    model = load_fusion(case.weight_path(), video_cfg, audio_cfg, placement)
    if parallel is not None:
        parallel.apply(model)
    tensors = {k: v.to(placement.device) for k, v in case.tensors.items()}
    batch = int(cfg.get("batch", 1))
    pick = lambda prefix: [tensors[f"{prefix}_{b}"] for b in range(batch)]  # noqa: E731

    cmp = Comparison(case.tolerance)
    seen: dict[str, torch.Tensor] = {}

    def observe(i: int, v: Tokens, a: Tokens) -> None:
        # whole streams, at the unsplit length (sequence parallel pads to a multiple of the degree)
        seen[f"vid_block{i}_out"] = gather_tokens(parallel, v.x, seen["vid_embedded"].shape[1])
        seen[f"audio_block{i}_out"] = gather_tokens(parallel, a.x, seen["audio_embedded"].shape[1])

    # the embeddings are checked through the same `embed` the forward uses
    v = model.video_model.embed(
        pick("vid_in"),
        tensors["t"],
        pick("vid_context"),
        cfg.get("vid_seq_len"),
        bool(cfg.get("first_frame_is_clean", False)),
    )
    a = model.audio_model.embed(
        pick("audio_in"), tensors["t"], pick("audio_context"), cfg.get("audio_seq_len")
    )
    for name, tokens in (("vid", v), ("audio", a)):
        length = tokens.x.shape[1]
        seen[f"{name}_embedded"] = tokens.x
        seen[f"{name}_time_emb"] = tokens.e.expand(-1, length, -1)
        seen[f"{name}_time_proj"] = tokens.e0.expand(-1, length, -1, -1)
        seen[f"{name}_context_emb"] = tokens.context
        seen[f"{name}_grid_sizes"] = torch.tensor(tokens.grids, dtype=torch.int64)
        seen[f"{name}_seq_lens"] = torch.tensor(tokens.seq_lens, dtype=torch.int64)

    video_out, audio_out = model(
        pick("vid_in"),
        pick("audio_in"),
        tensors["t"],
        pick("vid_context"),
        pick("audio_context"),
        video_seq_len=cfg.get("vid_seq_len"),
        audio_seq_len=cfg.get("audio_seq_len"),
        first_frame_is_clean=bool(cfg.get("first_frame_is_clean", False)),
        slg_layer=int(cfg.get("slg_layer", 0)),
        observer=observe,
    )
    for b in range(batch):
        seen[f"vid_out_{b}"], seen[f"audio_out_{b}"] = video_out[b], audio_out[b]

    expected = [k for k in tensors if k in seen]
    missing = [k for k in case.spec.get("outputs", {}) if k not in seen]
    for name in missing:
        cmp.failures.append(f"{name}: not produced")
    for name in expected:
        cmp.tensor(name, seen[name], case.tensors[name])
    return cmp.result(case)
