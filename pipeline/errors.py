"""One exception hierarchy for the packages above `shm_loader` (pipeline, jobs, tasks, the CLI).

The CLI shows ``str(error)`` as one line (cause and remedy) and exits 1. `shm_loader` has its own
`SegmentError` (it imports nothing of ours); callers convert it at their edge.
"""

from __future__ import annotations

from embedctl.errors import ConfigError, EmbedctlError

__all__ = ["EmbedctlError", "ConfigError", "CorpusError", "ModelError", "WeightsLost", "StorageError",
           "IndexNotFoundError", "BrokerError", "ServerError"]


class CorpusError(EmbedctlError):
    """The corpus cannot be read or does not have the expected shape."""


class ModelError(EmbedctlError):
    """The model cannot be resolved or loaded."""


class WeightsLost(ModelError):
    """The device weights a process computes with went away (their exporter exited): the work is retried, it has
    not failed."""


class StorageError(EmbedctlError):
    """An output folder (vectors, index versions) is missing, foreign or damaged."""


class IndexNotFoundError(StorageError):
    """No published index where one was expected."""


class BrokerError(EmbedctlError):
    """The Celery broker cannot be reached or refused the connection."""


class ServerError(EmbedctlError):
    """An embedctl server cannot be reached or refused a request (`--server`)."""
