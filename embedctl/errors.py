"""The root of embedctl's errors, below every package so that `embedctl.settings` can raise them too.

`embedctl.pipeline.errors` holds the rest of the hierarchy and re-exports these two; import them from there.
"""

from __future__ import annotations


class EmbedctlError(Exception):
    """Root of all errors whose message is meant for the user: one line, cause and remedy."""


class ConfigError(EmbedctlError):
    """A setting or job spec value is invalid."""
