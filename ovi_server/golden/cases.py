"""Reading golden cases and comparing tensors with the manifest tolerances."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor


@dataclass
class GoldenCase:
    component: str
    folder: Path
    spec: dict[str, Any]  # the case's entry in manifest.json
    manifest: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def config(self) -> dict[str, Any]:
        return self.spec.get("config", {})

    @property
    def tolerance(self) -> dict[str, float]:
        tol = self.spec.get("tolerance", {})
        if not isinstance(tol, Mapping):  # e.g. "exact string equality"
            return {"atol": 0.0, "rtol": 0.0}
        return {"atol": float(tol.get("atol", 0.0)), "rtol": float(tol.get("rtol", 0.0))}

    def path(self, key: str) -> Path:
        return self.folder / self.spec[key]

    def weight_path(self, name: str | None = None) -> Path:
        """The case's weight file (`weight_file`), or one of `weight_files` by key."""
        if name is None:
            return self.folder / self.spec["weight_file"]
        files = self.spec["weight_files"]
        return self.folder / (files[name] if isinstance(files, Mapping) else name)

    @cached_property
    def tensors(self) -> dict[str, Tensor]:
        """Inputs and expected outputs, stored together in `input_file`."""
        return load_file(str(self.path("input_file")))


def load_cases(root: Path, component: str) -> list[GoldenCase]:
    folder = root / component
    manifest = json.loads((folder / "manifest.json").read_text())
    return [GoldenCase(component, folder, spec, manifest) for spec in manifest["cases"]]


def components_in(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob("*/manifest.json"))


@dataclass
class CaseResult:
    component: str
    name: str
    passed: bool
    max_abs_err: float = 0.0
    detail: str = ""

    def line(self) -> str:
        word = "PASS" if self.passed else "FAIL"
        text = f"{word} {self.component}/{self.name} max_abs_err={self.max_abs_err:.3g}"
        return f"{text} {self.detail}" if self.detail else text


class Comparison:
    """Accumulates tensor comparisons for one case: pass when |a - r| <= atol + rtol*|r| everywhere."""

    def __init__(self, tolerance: Mapping[str, float]):
        self.atol = float(tolerance.get("atol", 0.0))
        self.rtol = float(tolerance.get("rtol", 0.0))
        self.max_abs_err = 0.0
        self.failures: list[str] = []

    def tensor(self, name: str, actual: Tensor, expected: Tensor) -> None:
        actual = actual.detach().to("cpu")
        if tuple(actual.shape) != tuple(expected.shape):
            self.failures.append(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
            self.max_abs_err = float("inf")
            return
        if not expected.is_floating_point():
            bad = int((actual.to(expected.dtype) != expected).sum())
            if bad:
                self.failures.append(f"{name}: {bad} values differ")
                self.max_abs_err = float("inf")
            return
        a, r = actual.double(), expected.double()
        err = (a - r).abs()
        worst = float(err.max()) if err.numel() else 0.0
        if not torch.isfinite(a).all():
            worst = float("inf")
        self.max_abs_err = max(self.max_abs_err, worst)
        if not bool((err <= self.atol + self.rtol * r.abs()).all()) or worst == float("inf"):
            self.failures.append(f"{name}: max_abs_err={worst:.3g}")

    def exact(self, name: str, actual: Any, expected: Any) -> None:
        if actual != expected:
            self.failures.append(f"{name}: {actual!r} != {expected!r}")

    def result(self, case: GoldenCase) -> CaseResult:
        detail = "; ".join(self.failures[:3])
        if len(self.failures) > 3:
            detail += f"; and {len(self.failures) - 3} more"
        return CaseResult(case.component, case.name, not self.failures, self.max_abs_err, detail)
