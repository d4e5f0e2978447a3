"""The few exception types; each says what was wrong, what was expected and what to do."""

from __future__ import annotations


class OviError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(OviError):
    """A config file or option is malformed."""


class InvalidInput(OviError):
    """A request value is wrong; the API turns it into a 422 with loc ["body", field]."""

    def __init__(self, field: str, msg: str, kind: str = "value_error"):
        super().__init__(f"{field}: {msg}")
        self.field, self.msg, self.kind = field, msg, kind


class WeightsError(OviError):
    """A checkpoint is missing, unreadable or does not match the model."""


class JobNotFound(OviError):
    """No job with that id (404)."""


class Cancelled(OviError):
    """Raised from a step callback: the job ends cancelled, not failed."""


class RankFailed(OviError):
    """A process of a parallel group (--sp, --cfg-parallel) failed during a request; the group is stopped
    and runs no more requests."""

    def __init__(self, message: str, rank: int, error_type: str):
        super().__init__(message)
        self.rank = rank  # the rank that failed first (0: this process)
        self.error_type = error_type  # its exception's class name (e.g. "OutOfMemoryError")
