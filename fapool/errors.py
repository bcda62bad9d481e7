"""Why a request failed, as a type every layer shares: the base actor sets it, `Cluster` raises it,
the HTTP layer maps it to a status and the batch job retries or counts by it."""
from __future__ import annotations

from enum import Enum


class ErrorType(str, Enum):
    """The values are the strings that travel in `RequestOutput.error_type`."""

    INVALID_REQUEST = "invalid_request"  # the request can never run as sent (a bad value, too long)
    OVERLOADED = "overloaded"  # the base's queue is full: the same request may run later
    INTERNAL = "internal"  # the server failed (an engine fault, a dead actor)

    @classmethod
    def of(cls, value: str | None) -> "ErrorType":
        """The type of an error event; one without a type (an engine fault) is internal."""
        return cls(value) if value in cls._value2member_map_ else cls.INTERNAL

    @property
    def retryable(self) -> bool:
        return self is ErrorType.OVERLOADED


class RequestError(ValueError):
    """A request the cluster refused or could not finish. A `ValueError`, so callers that caught
    the untyped error before keep working; `.type` says whether to fix, retry or report it."""

    def __init__(self, message: str, type: ErrorType = ErrorType.INVALID_REQUEST) -> None:
        super().__init__(message)
        self.type = ErrorType(type)
