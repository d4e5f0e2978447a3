"""Golden cases drawn at random and computed by the reference, then checked through our golden runners.

    python -m benchmarks.differential --reference DIR [--out DIR] [--seed S] [--cases N]
                                      [--component NAME ...] [--keep] [--sp N] [--cfg-parallel]

The golden vectors in tests/golden cover a handful of seeds, shapes and configs; a held-back set with
others judges the work. This tool makes more of the same kind on demand: each component's generator
draws configs, shapes and inputs from `--seed`, runs the reference implementation (character-ai/Ovi,
imported from the user's checkout DIR at run time, never copied or downloaded) on tiny random weights in
float32 on the CPU, and writes the cases in the golden format (manifest.json + safetensors, key names of
the official checkpoints). Then `python -m ovi_server.golden check OUT` runs them through the code the
server uses, and the tool reports per case and exits 1 on any failure (`--sp`, `--cfg-parallel`: the
fusion and loop cases run parallel, as `ovi_server.golden check` does with them).

The reference's modules import einops and librosa, which are not dependencies of ours; install them
beside the reference, not into the server's environment, e.g.
`pip install --target /opt/ovi-ref-deps einops librosa` and `PYTHONPATH=/opt/ovi-ref-deps`.

A generator module (`benchmarks.differential.<name>`, one per entry of GENERATORS) defines
`generate(reference: Path, out: Path, rng: random.Random, cases: int) -> None` and ends with
`if __name__ == "__main__": sys.exit(generator_main(generate))`. Each runs in its own process, since
each imports a different part of the reference under the reference's own package names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

# generator module (under benchmarks.differential) -> the golden folders it writes
GENERATORS = {
    "t5": ("t5", "prompt"),
    "wan_vae": ("wan_vae",),
    "mmaudio": ("mmaudio",),
    "fusion": ("fusion", "loop", "sampler"),
}


class ComponentWriter:
    """Collects one component's cases and files; `close()` writes manifest.json with sizes and sha256."""

    def __init__(self, out: Path, component: str, **header: Any):
        self.folder = out / component
        self.folder.mkdir(parents=True, exist_ok=True)
        self.component = component
        self.header = header
        self.cases: list[dict[str, Any]] = []

    def tensors(self, name: str, tensors: Mapping[str, Tensor]) -> str:
        """Writes a safetensors file; returns its name for the case's `input_file` / `weight_file`."""
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(self.folder / name))
        return name

    def json(self, name: str, data: Any) -> str:
        (self.folder / name).write_text(json.dumps(data, indent=1))
        return name

    def copy(self, source: Path, name: str | None = None) -> str:
        name = name or source.name
        (self.folder / name).write_bytes(source.read_bytes())
        return name

    def case(self, **spec: Any) -> None:
        self.cases.append(spec)

    def close(self) -> Path:
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in sorted(self.folder.iterdir())
            if p.name != "manifest.json"
        }
        manifest = {"component": self.component, **self.header, "cases": self.cases, "files": files}
        path = self.folder / "manifest.json"
        path.write_text(json.dumps(manifest, indent=1))
        return path


def shapes(tensors: Mapping[str, Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in tensors.items()}


def seeded(rng: Any) -> torch.Generator:
    """A torch generator seeded from the tool's random.Random, so a run is reproducible from --seed."""
    return torch.Generator().manual_seed(rng.randrange(2**31))


def generator_main(generate: Callable[..., None], argv: Sequence[str] | None = None) -> int:
    """The command line of one generator: --reference DIR --out DIR --seed S --cases N."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    generate(args.reference.resolve(), args.out, random.Random(args.seed), args.cases)
    return 0
