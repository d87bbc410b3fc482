"""Chorus: token-level ensembles of LLMs. This package is the client SDK (no torch needed)."""

from chorus.client import (
    DEFAULT_TIMEOUT,
    AsyncClient,
    AsyncStream,
    Client,
    EnsembleInfo,
    ModelInfo,
    ModelUsage,
    Result,
    RetryPolicy,
    Stream,
    Usage,
)
from chorus.errors import (
    Cancelled,
    ChorusError,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncStream",
    "Cancelled",
    "ChorusError",
    "Client",
    "DeadlineExceeded",
    "EnsembleInfo",
    "InvalidArgument",
    "ModelInfo",
    "ModelUsage",
    "ResourceExhausted",
    "Result",
    "RetryPolicy",
    "Stream",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
