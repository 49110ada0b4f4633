"""`embedctl status` and `embedctl worker`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from jobs.cli.common import handle_errors, print_json
from pipeline import defaults


@click.command()
@click.argument("job", type=click.Path())
@click.option("--json", "as_json", is_flag=True, envvar="EMBEDCTL_JSON", help="Print the job state as JSON.")
@handle_errors
def status(job: str, as_json: bool) -> None:
    """State of the newest job in an --out folder JOB (or of a job folder OUT/work/<job id>), read from disk."""
    from jobs.state import status as job_status

    data = job_status(Path(job))
    if as_json:
        print_json(data)
        return
    click.echo(f"job {data['job_id']} ({data['mode'] or 'unknown'}, submitted {data['submitted'] or '?'}): "
               f"{data['state']}")
    click.echo(f"chunks {data['chunks_done']}/{data['chunks_total']}, rows {data['rows_done']}/{data['rows_total']}"
               + (f", published {data['version']}" if data["version"] else ""))
    for error in data["errors"]:
        click.echo(f"error: {error}")


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--model", "-m", envvar="EMBEDCTL_MODEL", show_envvar=True, default=defaults.DEFAULT_MODEL,
              show_default=True, help="The model this host serves: published to shared memory, attached by children.")
@click.option("--broker", envvar="EMBEDCTL_BROKER_URL", show_envvar=True, default=None,
              help="Redis URL [default: redis://127.0.0.1:6379/0].")
@click.option("--concurrency", "-c", type=int, envvar="EMBEDCTL_CONCURRENCY", show_envvar=True, default=None,
              help="Pool children [default: one per GPU, else one per CPU core].")
@click.option("--queues", "-Q", envvar="EMBEDCTL_QUEUES", show_envvar=True, default=None,
              help="Queues to consume [default: both embedctl.embed and embedctl.build].")
@click.option("--dtype", envvar="EMBEDCTL_DTYPE", show_envvar=True, default="auto", show_default=True)
@click.option("--device", envvar="EMBEDCTL_DEVICE", show_envvar=True, default="auto", show_default=True)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def worker(model: str, broker: str | None, concurrency: int | None, queues: str | None, dtype: str, device: str,
           loglevel: str, celery_args: tuple[str, ...]) -> None:
    """Publish MODEL's weights to shared memory (if needed) and start a prefork Celery worker on them.

    Extra arguments go to `celery worker`. The plain `celery -A tasks worker` works too (set EMBEDCTL_MODEL).
    """
    from jobs.distributed import check_broker
    from pipeline.encoder import resolve_device, resolve_dtype
    from pipeline.models import read_profile, resolve_model
    from shm_loader.segment import publish
    from tasks.settings import Settings

    settings = Settings.from_env(broker_url=broker)
    check_broker(settings)
    folder = read_profile(resolve_model(model).path).transformer_path
    dev = resolve_device(device)
    gpus = __import__("torch").cuda.device_count() if dev.type == "cuda" else 0
    if os.environ.get("EMBEDCTL_SHM", "auto") != "off":
        result = publish(folder, resolve_dtype(dtype, dev))
        click.echo(("published " if result["published"] else "attaching to ") + result["name"], err=True)
    env = dict(os.environ, EMBEDCTL_MODEL=model, EMBEDCTL_BROKER_URL=settings.broker_url, EMBEDCTL_DTYPE=dtype,
               EMBEDCTL_DEVICE=device)
    argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "prefork",
            "--concurrency", str(concurrency or gpus or os.cpu_count() or 1),
            "--queues", queues or f"{settings.embed_queue},{settings.build_queue}", "--loglevel", loglevel,
            *celery_args]
    # exec: the worker parent starts fresh, without the torch state this process created while publishing
    os.execvpe(argv[0], argv, env)
