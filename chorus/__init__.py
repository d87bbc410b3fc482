"""Chorus: token-level ensembles of LLMs. This package is the client SDK (no torch needed)."""

from chorus.client import AsyncClient, Client, EnsembleInfo, ModelInfo, ModelUsage, Result, Usage
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
    "AsyncClient",
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
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
