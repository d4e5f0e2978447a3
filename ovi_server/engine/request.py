"""The request and result types moved to `ovi_server/request.py` (low enough for jobs/ and api/ to share
without importing the engine); this alias keeps `ovi_server.engine.request` imports of branches in
flight working and can go once they have landed."""

from ovi_server.request import (  # noqa: F401
    MAX_RANDOM_SEED,
    MAX_SEED,
    SOLVERS,
    Clip,
    GenerationRequest,
    Progress,
    ProgressCallback,
    check_request,
    ignore_progress,
)
