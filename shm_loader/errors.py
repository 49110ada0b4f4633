"""The errors of the shared-memory layer.

`shm_loader` is the lowest layer of embedctl and imports nothing of the other packages: callers convert these
errors at their edge (the CLI shows the message as one line; the encoder turns it into a model error).
"""

from __future__ import annotations


class SegmentError(Exception):
    """A weight segment cannot be published, attached or released; the message says why and what to do."""
