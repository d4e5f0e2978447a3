"""HTTP API: fal's queue protocol over a JobStore. Never imports torch."""
