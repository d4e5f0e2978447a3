"""`python -m ovi_server.golden check [DIR] [--component NAME ...]` (DIR: tests/golden of a checkout)"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

import torch

from ovi_server.engine.parallel import ParallelGroup, ParallelSpec, check_spec, run_spmd
from ovi_server.errors import ConfigError
from ovi_server.golden.cases import CaseResult, components_in, load_cases
from ovi_server.golden.on_rank import check_on_rank

# the reference's vectors kept in the repository (tests/golden/README.md says where they came from)
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "tests" / "golden"

# component folder -> module with `run_case(case) -> CaseResult`
RUNNERS = {
    "fusion": "ovi_server.golden.run_fusion",
    "sampler": "ovi_server.golden.run_sampler",
    "loop": "ovi_server.golden.run_loop",
    "prompt": "ovi_server.golden.run_prompt",
    "t5": "ovi_server.golden.run_t5",
    "wan_vae": "ovi_server.golden.run_wan_vae",
    "mmaudio": "ovi_server.golden.run_mmaudio",
}


# runners that take `parallel=`: run on every rank under --sp / --cfg-parallel; the others on rank 0 only
PARALLEL_RUNNERS = {"fusion", "loop"}


def check(
    root: Path, components: list[str] | None, out=sys.stdout, parallel: ParallelGroup | None = None
) -> tuple[int, int]:
    """Runs every case of the components; prints one line per case. Returns (passed, failed).

    With `parallel` every rank calls this; rank 0 prints."""
    torch.set_grad_enabled(False)
    leader = parallel is None or parallel.is_leader
    wanted = components or components_in(root)
    passed = failed = 0
    for component in wanted:
        results: list[CaseResult] = []
        if not (root / component / "manifest.json").is_file():
            results.append(
                CaseResult(component, "*", False, float("inf"), f"no {root / component}/manifest.json")
            )
        elif component not in RUNNERS:
            results.append(CaseResult(component, "*", False, float("inf"), "no runner for this component"))
        else:
            runner = importlib.import_module(RUNNERS[component])
            in_parallel = parallel is not None and component in PARALLEL_RUNNERS
            if not leader and not in_parallel:
                continue
            for case in load_cases(root, component):
                try:
                    if in_parallel:
                        results.append(runner.run_case(case, parallel=parallel))
                    else:
                        results.append(runner.run_case(case))
                except Exception as exc:  # a crash is a failed case, reported with its cause
                    detail = f"error: {type(exc).__name__}: {exc}"
                    traceback.print_exc(file=sys.stderr)
                    results.append(CaseResult(component, case.name, False, float("inf"), detail))
        for result in results if leader else ():
            print(result.line(), file=out, flush=True)
            passed += result.passed
            failed += not result.passed
    return passed, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ovi_server.golden")
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="run golden cases and compare with the manifest tolerances")
    chk.add_argument(
        "dir",
        type=Path,
        nargs="?",
        default=DEFAULT_DIR,
        help=f"a golden directory (default: {DEFAULT_DIR}, the vectors that ship with the repository)",
    )
    chk.add_argument("--component", nargs="+", help="only these component folders (default: all in DIR)")
    chk.add_argument(
        "--sp", type=int, default=1, help="run fusion and loop cases sequence parallel on this many processes"
    )
    chk.add_argument(
        "--cfg-parallel", action="store_true", help="loop cases: positive and negative passes on two groups"
    )
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        print(f"error: {args.dir} is not a directory", file=sys.stderr)
        return 2
    spec = ParallelSpec(args.sp, args.cfg_parallel)
    if spec.enabled:
        try:
            check_spec(spec, "cpu")
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        passed, failed = run_spmd(spec, "cpu", check_on_rank, args.dir, args.component)
    else:
        torch.manual_seed(0)
        passed, failed = check(args.dir, args.component)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
