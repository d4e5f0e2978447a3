"""Golden `sampler`: schedules (timesteps exact, sigmas within tolerance) and solver trajectories."""

from __future__ import annotations

from ovi_server.engine.solvers import make_solver
from ovi_server.golden.cases import CaseResult, Comparison, GoldenCase


def run_case(case: GoldenCase) -> CaseResult:
    cmp = Comparison(case.tolerance)
    tensors = case.tensors
    if "index" in case.spec:  # schedules for many (solver, steps, shift)
        for entry in case.spec["index"]:
            solver = make_solver(entry["solver"], int(entry["steps"]), float(entry["shift"]))
            label = f"{entry['solver']} n={entry['steps']} shift={entry['shift']}"
            expected_t = tensors[entry["timesteps"]]
            if solver.timesteps.dtype != expected_t.dtype:
                cmp.failures.append(
                    f"{label}: timesteps dtype {solver.timesteps.dtype} != {expected_t.dtype}"
                )
            cmp.tensor(f"{label} timesteps", solver.timesteps.to(expected_t.dtype), expected_t)
            cmp.tensor(f"{label} sigmas", solver.sigmas, tensors[entry["sigmas"]])
        return cmp.result(case)

    cfg = case.config
    solver = make_solver(cfg["solver"], int(cfg["steps"]), float(cfg["shift"]))
    cmp.tensor("timesteps", solver.timesteps.to(tensors["timesteps"].dtype), tensors["timesteps"])
    x = tensors["sample_init"]
    for i, t in enumerate(solver.timesteps):
        x = solver.step(tensors["model_outputs"][i], t, x)
        cmp.tensor(f"samples[{i}]", x, tensors["samples"][i])
    return cmp.result(case)
