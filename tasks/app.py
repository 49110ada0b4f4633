"""The Celery app of embedctl (`celery -A tasks worker`, `celery -A tasks inspect ...`)."""

from __future__ import annotations

from celery import Celery

from tasks.settings import Settings, celery_config


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from `settings` (default: the EMBEDCTL_* environment)."""
    app = Celery("embedctl")
    configure(app, settings or Settings.from_env())
    return app


def configure(app: Celery, settings: Settings) -> None:
    """Apply `settings` to `app` (the CLI does this for `--broker`); EMBEDCTL_JOBS fills the beat schedule."""
    app.conf.update(celery_config(settings))
    app.conf.embedctl_settings = settings
    if settings.jobs_path:
        from jobs.schedule import beat_schedule
        from jobs.specfile import load_jobs

        app.conf.beat_schedule = beat_schedule(load_jobs(settings.jobs_path), settings.build_queue)


app = create_app()
