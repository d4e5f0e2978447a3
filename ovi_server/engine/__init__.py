"""The engine: placement, schedules, solvers, the denoising loop and the pipeline. No HTTP, no job store."""
