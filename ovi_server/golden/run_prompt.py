"""Golden runner for `prompt/`: prompt rewrites and resolution arithmetic, compared exactly.

Each manifest case names a list of sub-cases in `prompt_and_shapes.json` (its `key`); one
`CaseResult` per manifest case, with the first few mismatching sub-cases in the detail.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from typing import Any

from ovi_server.config import OviConfig, load_variant
from ovi_server.golden.cases import CaseResult, Comparison, GoldenCase
from ovi_server.prompt import clean_text, format_prompt, format_prompt_for_filename
from ovi_server.shapes import (
    area_warning,
    best_hw_for_area,
    generation_shape,
    scale_hw_to_area_divisible,
    snap_hw_to_multiple_of_32,
)


@cache
def _variant(name: str) -> OviConfig:
    """The variant as the server loads it (configs/<name>.json): caption style and latent lengths."""
    return load_variant(name)


def _prompt_case(sub: dict[str, Any], cmp: Comparison, where: str) -> None:
    prompt = sub["prompt"]
    cmp.exact(f"{where} clean_text", clean_text(prompt), sub["clean_text"])
    cmp.exact(
        f"{where} format_prompt_for_filename",
        format_prompt_for_filename(prompt),
        sub["format_prompt_for_filename"],
    )
    for key in sub:
        if not key.startswith("formatter_"):
            continue
        variant = key.removeprefix("formatter_")
        formatted = format_prompt(prompt, _variant(variant).prompt_style)
        cmp.exact(f"{where} {key}", formatted, sub[key])
        if f"changed_{variant}" in sub:
            cmp.exact(f"{where} changed_{variant}", formatted != prompt, sub[f"changed_{variant}"])


def _t2v_case(sub: dict[str, Any], cmp: Comparison, where: str) -> None:
    h, w = sub["requested_hw"]
    area = sub["target_area"]
    variant = _variant(sub["model"])
    if variant.video_area != area:
        cmp.failures.append(f"{where}: configs/{sub['model']}.json video_area {variant.video_area} != {area}")
    snapped = snap_hw_to_multiple_of_32(h, w, area=area)
    shape = generation_shape(*snapped, variant.video_latent_length, variant.audio_latent_length)
    cmp.exact(f"{where} snapped_hw", list(snapped), sub["snapped_hw"])
    cmp.exact(f"{where} area_warning", area_warning(h, w, area), sub["area_warning"])
    cmp.exact(f"{where} video_latent_shape", list(shape.video_latent_shape), sub["video_latent_shape"])
    cmp.exact(f"{where} video_tokens", shape.video_tokens, sub["video_tokens"])
    cmp.exact(f"{where} video_latent_hw_odd", shape.latent_hw_odd, sub["video_latent_hw_odd"])
    cmp.exact(f"{where} audio_latent_shape", list(shape.audio_latent_shape), sub["audio_latent_shape"])
    cmp.exact(f"{where} num_frames", shape.num_frames, sub["num_frames"])
    cmp.exact(f"{where} audio_samples_16k", shape.audio_samples, sub["audio_samples_16k"])


def _i2v_case(sub: dict[str, Any], cmp: Comparison, where: str) -> None:
    h, w = sub["image_hw"]
    resized = best_hw_for_area(h, w, sub["target_area"])
    cmp.exact(f"{where} resized_hw", list(resized), sub["resized_hw"])
    if "resized" in sub:
        cmp.exact(f"{where} resized", resized != (h, w), sub["resized"])
    if "video_latent_hw" in sub:
        cmp.exact(f"{where} video_latent_hw", [resized[0] // 16, resized[1] // 16], sub["video_latent_hw"])


def _flux_case(sub: dict[str, Any], cmp: Comparison, where: str) -> None:
    h, w = sub["hw"]
    got = scale_hw_to_area_divisible(h, w, area=1024 * 1024, n=16)
    cmp.exact(f"{where} size", list(got), sub["scale_hw_to_area_divisible_1024sq_n16"])


CHECKS: dict[str, Callable[[dict[str, Any], Comparison, str], None]] = {
    "prompt_cases": _prompt_case,
    "t2v_shape_cases": _t2v_case,
    "i2v_resize_cases": _i2v_case,
    "t2i2v_flux_size_cases": _flux_case,
}


def _label(sub: dict[str, Any]) -> str:
    """Names a sub-case in a failure line so it can be found in the JSON."""
    if "prompt" in sub:
        return f"prompt={sub['prompt'][:40]!r}"
    if "requested_hw" in sub:
        return f"hw={sub['requested_hw']} model={sub.get('model')}"
    if "image_hw" in sub:
        return f"image_hw={sub['image_hw']} area={sub['target_area']}"
    return f"hw={sub.get('hw')}"


def run_case(case: GoldenCase) -> CaseResult:
    key = case.spec.get("key", case.name)
    if key not in CHECKS:
        return CaseResult(case.component, case.name, False, float("inf"), f"no check for key {key!r}")
    subs = json.loads(case.path("input_file").read_text())[key]
    cmp = Comparison(case.tolerance)
    if not subs:
        cmp.failures.append(f"{key}: no sub-cases in {case.spec['input_file']}")
    for i, sub in enumerate(subs):
        CHECKS[key](sub, cmp, f"[{i}] {_label(sub)}")
    result = cmp.result(case)
    if result.passed:
        result.detail = f"{len(subs)} sub-cases"
    return result
