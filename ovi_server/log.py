"""configure_logging(): called once, by cli.py."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

# Libraries whose INFO/WARNING chatter is noise for an operator (diffusers warns that attention
# backends are "experimental" and about dtype casts of our own modules on every start).
_QUIET = ("diffusers", "transformers", "httpx", "huggingface_hub")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Root handler on stderr, text or one JSON object per line; third-party loggers at ERROR."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    # diffusers and transformers reset their loggers' level when first imported, to these variables'
    # values; setting them instead of importing diffusers here keeps torch out of processes that never
    # load a model (the API server, `generate` refusing bad input).
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
