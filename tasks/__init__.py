"""Celery layer of embedctl: the app, thin tasks and worker signals.

`celery -A embedctl.tasks worker` finds `embedctl.tasks.app`. Only Celery imports this package (`embedctl worker`
execs that command); the submitter sends tasks by name.
"""

from embedctl.tasks import embed, worker  # noqa: E402,F401 - register the tasks and the worker signal handlers
from embedctl.tasks.app import app

__all__ = ["app"]
