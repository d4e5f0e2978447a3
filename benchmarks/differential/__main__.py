"""`python -m benchmarks.differential --reference DIR ...` (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.differential import GENERATORS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.differential")
    parser.add_argument(
        "--reference", type=Path, required=True, help="a character-ai/Ovi checkout (read only)"
    )
    parser.add_argument("--out", type=Path, help="where the cases go (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="draws configs, shapes, inputs and weights")
    parser.add_argument("--cases", type=int, default=4, help="cases per kind of call")
    parser.add_argument("--component", nargs="+", choices=sorted(GENERATORS), help="default: all")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--sp", type=int, default=1, help="check fusion and loop sequence parallel on N processes"
    )
    parser.add_argument(
        "--cfg-parallel", action="store_true", help="check loop cases with guidance on two groups"
    )
    args = parser.parse_args(argv)
    if not (args.reference / "ovi").is_dir():
        print(f"error: {args.reference} is not a character-ai/Ovi checkout (no ovi/ inside)", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="ovi-differential-"))
    names = args.component or sorted(GENERATORS)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in names:
        started = time.monotonic()
        # each generator seeds from --seed and its position in GENERATORS, so adding one changes no other
        seed = args.seed * 1000 + sorted(GENERATORS).index(name)
        command = [sys.executable, "-m", f"benchmarks.differential.{name}", "--reference", str(args.reference),
                   "--out", str(out), "--seed", str(seed), "--cases", str(args.cases)]  # fmt: skip
        print(f"generating {name} (seed {seed}) ...", flush=True)
        if subprocess.run(command, env=env).returncode != 0:
            print(f"error: the {name} generator failed (above)", file=sys.stderr)
            return 2
        print(f"  {time.monotonic() - started:.1f} s", flush=True)
    components = [c for name in names for c in GENERATORS[name]]
    check = [sys.executable, "-m", "ovi_server.golden", "check", str(out), "--component", *components]
    check += ["--sp", str(args.sp)] + (["--cfg-parallel"] if args.cfg_parallel else [])
    print(f"checking: {' '.join(check[1:])}", flush=True)
    rc = subprocess.run(check, env=env).returncode
    if args.out is None and not args.keep and rc == 0:
        shutil.rmtree(out)
    elif rc:
        print(f"cases kept in {out}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
