"""`embedctl worker`: the bootstrap of a worker host (weights published once, exporters, the Celery worker)."""

from __future__ import annotations

import os
import sys

import click

from embedctl.cli.common import cache_options, env_option, exported_devices, shm_option
from embedctl.pipeline import defaults
from embedctl.pipeline.errors import EmbedctlError
from embedctl.settings import BROKER_ENV, setting


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--model", "-m", envvar="EMBEDCTL_MODEL", show_envvar=True, default=defaults.DEFAULT_MODEL,
              show_default=True, help="The model this host serves: published to shared memory, attached by children.")
@click.option("--broker", envvar=list(BROKER_ENV), show_envvar=True, default=None,
              help="Redis URL of the broker (none: refused).")
@click.option("--concurrency", "-c", type=int, envvar="EMBEDCTL_CONCURRENCY", show_envvar=True, default=None,
              help="Pool children [default: one per GPU, else one per CPU core].")
@click.option("--queues", "-Q", envvar="EMBEDCTL_QUEUES", show_envvar=True, default=None,
              help="Queues to consume [default: both embedctl.embed and embedctl.build].")
@click.option("--dtype", envvar="EMBEDCTL_DTYPE", show_envvar=True, default="auto", show_default=True)
@click.option("--device", envvar="EMBEDCTL_DEVICE", show_envvar=True, default="auto", show_default=True)
@click.option("--device-share", envvar="EMBEDCTL_DEVICE_SHARE", show_envvar=True, default="auto", show_default=True,
              type=click.Choice(["auto", "on", "off"]),
              help="One device copy of the weights per GPU, mapped by every child on it (auto: on CUDA hosts).")
@shm_option
@env_option("--loglevel", "-l", env="LOGLEVEL", default="INFO", show_default=True, help="Celery's log level.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@cache_options
def worker(model: str, broker: str | None, concurrency: int | None, queues: str | None, dtype: str, device: str,
           device_share: str, shm: str, loglevel: str, celery_args: tuple[str, ...]) -> None:
    """Publish MODEL's weights to shared memory (if needed) and start a prefork Celery worker on them.

    On a GPU host it also starts one weight exporter per GPU, which holds the weights there once and hands them to
    the pool children on that GPU (CUDA IPC), and restarts an exporter that exits. Extra arguments go to `celery
    worker`. The plain `celery -A embedctl.tasks worker` works too (set EMBEDCTL_MODEL); it consumes both queues
    unless given -Q, and its children copy the weights to their GPU each.
    """
    from embedctl.jobs.broker import Settings, check_broker
    from embedctl.pipeline.loader import gpus_for, resolve_device, resolve_dtype
    from embedctl.pipeline.models import read_profile, resolve_model
    from embedctl.shm_loader.segment import publish

    if shm == "off" and device_share == "on":
        raise click.UsageError("--device-share on (or EMBEDCTL_DEVICE_SHARE=on) needs the shared-memory segment it "
                               "copies to the devices, and --shm off (or EMBEDCTL_SHM=off) turns it off; drop one")
    deaths = _deaths_from_env()
    settings = Settings.from_env(broker_url=broker)
    check_broker(settings)
    folder = read_profile(resolve_model(model).path).transformer_path
    dev = resolve_device(device)
    gpus = gpus_for(dev)
    children = concurrency or gpus or os.cpu_count() or 1
    torch_dtype = resolve_dtype(dtype, dev)
    exporters = None
    if shm != "off":
        result = publish(folder, torch_dtype)
        click.echo(("published " if result["published"] else "attaching to ") + result["name"], err=True)
        devices = exported_devices(device_share, dev, gpus, children)
        if devices:
            from embedctl.shm_loader.supervise import Exporters

            exporters = Exporters(folder, torch_dtype, devices, log=lambda line: click.echo(line, err=True))
    env = dict(os.environ, EMBEDCTL_MODEL=model, EMBEDCTL_BROKER_URL=settings.url, EMBEDCTL_DTYPE=dtype,
               EMBEDCTL_DEVICE=device, EMBEDCTL_DEVICE_SHARE="off", EMBEDCTL_SHM=shm)
    if exporters is not None:
        env.update(exporters.environment())
    # -P: the working directory is not put first on sys.path, so files there (a tasks.py, say) are never imported
    argv = [sys.executable, "-P", "-m", "celery", "-A", "embedctl.tasks", "worker", "--pool", "prefork",
            "--concurrency", str(children),
            "--queues", queues or f"{settings.embed_queue},{settings.build_queue}", "--loglevel", loglevel,
            *celery_args]
    if exporters is None:
        # exec: the worker parent starts fresh, without the torch state this process created while publishing
        os.execvpe(argv[0], argv, env)
    try:
        exporters.start()
    except BaseException:
        exporters.stop()
        raise
    raise SystemExit(_supervise(argv, env, exporters, deaths, log=lambda line: click.echo(line, err=True)))


def _deaths_from_env():
    """How many deaths of the Celery worker within how long end `embedctl worker` (EMBEDCTL_WORKER_DEATHS,
    EMBEDCTL_WORKER_DEATH_WINDOW)."""
    from embedctl.shm_loader.supervise import Deaths

    return Deaths(setting("worker_deaths"), setting("worker_death_window"))


def _supervise(argv: list[str], env: dict, exporters, deaths, log) -> int:
    """Run the Celery worker as a child beside the exporters, restart an exporter that exits, and return Celery's
    exit code once it stops as asked.

    SIGTERM or SIGINT sent to this process becomes a SIGTERM to Celery (a warm shutdown, also when a terminal's
    Ctrl-C reached Celery too); SIGHUP, SIGQUIT and SIGUSR1 are passed on as they are (Celery's restart, cold
    shutdown and traceback dump). Once a shutdown is asked for, exporters are no longer restarted; they stop after
    Celery has exited (they are in a session of their own, out of reach of the terminal's Ctrl-C). Celery gets
    SIGTERM if this process dies (PR_SET_PDEATHSIG), so it never runs on without its exporters.

    A Celery worker that dies unasked (a signal, a non-zero exit: an OOM kill, a `kill -9`) is logged with its
    cause and started again after 1, 2, 4 ... s (`deaths`, a `supervise.Deaths`), beside the same exporters; one
    that keeps dying (5 times within 300 s by default) ends this command in one line, exit 1. Its pool children
    see their parent gone and exit (a busy one after its task). An exit with code 0 is a shutdown that someone asked
    Celery for (`celery control shutdown`): this command ends too.
    """
    import signal
    import subprocess
    import time

    from embedctl.shm_loader.supervise import describe_exit

    stopping: list[int] = []
    celery: list[subprocess.Popen] = []

    def forward(sig, _frame) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping.append(sig)
            sig = signal.SIGTERM
        if celery:
            celery[0].send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(sig, forward)
    try:
        while True:
            celery[:] = [subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent)]
            while celery[0].poll() is None:
                try:
                    celery[0].wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    if not stopping:
                        exporters.watch()
            code, pid = celery[0].returncode, celery[0].pid
            if stopping or code == 0:
                return code
            pause = deaths.record()
            if pause is None:
                raise EmbedctlError(
                    f"the Celery worker died {len(deaths.times)} times within {deaths.window:.0f} s (the last time, "
                    f"pid {pid} {describe_exit(code)}); giving up: find what ends it (the log above; `dmesg` for the "
                    "kernel's out-of-memory killer) and start `embedctl worker` again")
            died = len(deaths.times)
            log(f"the Celery worker (pid {pid}) {describe_exit(code)}: restarting it in {pause:.0f} s ({died} "
                f"death{'s' if died > 1 else ''} within {deaths.window:.0f} s; at {deaths.limit} `embedctl worker` "
                "gives up)")
            deadline = time.monotonic() + pause
            while time.monotonic() < deadline and not stopping:
                time.sleep(0.1)
                exporters.watch()
            if stopping:
                return 0  # asked to stop while nothing ran: nothing failed
    finally:
        if celery and celery[0].poll() is None:
            celery[0].terminate()
            celery[0].wait(timeout=60)
        exporters.stop()


def _die_with_parent() -> None:
    """In the Celery child before exec: SIGTERM when the bootstrap dies (Linux's PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
