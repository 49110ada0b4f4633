"""Celery layer of embedctl: the app, its settings, thin tasks and worker signals.

`celery -A tasks worker` finds `tasks.app`. Nothing imports this package except the CLI and Celery itself.
"""

from tasks import embed, worker  # noqa: E402,F401 - register the tasks and the worker signal handlers
from tasks.app import app

__all__ = ["app"]
