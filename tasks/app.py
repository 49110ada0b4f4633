"""The Celery app of embedctl (`celery -A embedctl.tasks worker`, `celery -A embedctl.tasks inspect ...`).

Its settings come from `embedctl.jobs.broker.Settings.from_env()`: EMBEDCTL_BROKER_URL, else CELERY_BROKER_URL, for
the broker and the result backend alike. A worker or beat started with neither refuses to start (one line on
stderr, exit 1) instead of guessing a broker; so does every `celery -A embedctl.tasks ...` command given a broker URL
that cannot be read (a password with a raw '/', say): one line that says how to write it, never a piece of it.
"""

from __future__ import annotations

import sys

from celery import Celery
from celery.signals import beat_init, celeryd_init

from embedctl.jobs.broker import Settings, celery_config
from embedctl.pipeline.errors import ConfigError


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from `settings` (default: the environment)."""
    app = Celery("embedctl")
    configure(app, settings or Settings.from_env())
    return app


def configure(app: Celery, settings: Settings) -> None:
    """Apply `settings` to `app`; EMBEDCTL_JOBS fills the beat schedule."""
    app.conf.update(celery_config(settings))
    app.conf.embedctl_settings = settings
    if settings.jobs_path:
        from embedctl.jobs.schedule import beat_schedule
        from embedctl.jobs.specfile import load_jobs

        app.conf.beat_schedule = beat_schedule(load_jobs(settings.jobs_path), settings.build_queue)


def settings() -> Settings:
    """The settings the app was configured with (what the tasks pass down)."""
    return app.conf.embedctl_settings


@celeryd_init.connect
@beat_init.connect
def _refuse_without_broker(**_kw) -> None:
    if not settings().broker_url:
        sys.stderr.write("Error: no broker is configured: set EMBEDCTL_BROKER_URL (or CELERY_BROKER_URL) to a Redis "
                         "URL such as redis://:PASSWORD@host:6379/0\n")
        raise SystemExit(1)


def _app_or_exit() -> Celery:
    """The app from the environment; a bad setting ends the command in one line (Celery would print a traceback
    that quotes the URL)."""
    try:
        return create_app()
    except ConfigError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        raise SystemExit(1) from None


app = _app_or_exit()
