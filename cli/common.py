"""What every CLI command shares: error formatting, progress bars, JSON output, logging set-up."""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from embedctl.pipeline.errors import ConfigError, EmbedctlError


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def _reader_gone(fd: int) -> bool:
    """Whether `fd` is a pipe (or socket) whose reading end is closed: poll reports an error on its write end."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def stdout_gone() -> bool:
    """Whether the reader of stdout has gone (False where stdout is no file, as under CliRunner)."""
    try:
        return _reader_gone(sys.stdout.fileno())
    except (OSError, ValueError):
        return False


@contextmanager
def quiet_when_stdout_closes() -> Iterator[None]:
    """End the command quietly (exit 0, nothing on stderr) when the reader of stdout goes away mid-output.

    Python's recipe (docs.python.org/3/library/signal.html#note-on-sigpipe): point stdout at /dev/null so that
    the interpreter's last flush of what is still buffered cannot fail again, then exit. Restoring SIGPIPE's
    default action instead would also kill `serve` and the workers on a broken socket. Exit 0 rather than a
    shell's 141: Python's buffered stdout takes a short write to a pipe whose reader has gone as success and drops
    the rest, so one cut output raises nothing and another raises here; 0 both ways keeps the status the same
    (a `set -o pipefail` script does not fail at random because its reader stopped early, by choice).
    """
    try:
        yield
        sys.stdout.flush()  # what is still buffered fails here, not at exit
    except OSError as exc:
        if exc.errno != errno.EPIPE or not stdout_gone():
            raise  # a broken socket (a server, the broker) is an error like any other
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):  # stderr too when it is the same pipe (`2>&1 | head`)
            if _reader_gone(stream.fileno()):
                os.dup2(devnull, stream.fileno())
        os.close(devnull)
        sys.exit(0)


@contextmanager
def user_errors() -> Iterator[None]:
    """The one place where an error becomes what the user sees (the `embedctl` group runs every command in it):
    a project error is one line on stderr and exit 1 (never a traceback for a user mistake), Ctrl-C that no
    command explained is exit 130; a reader of stdout that went away is left to `quiet_when_stdout_closes`."""
    from embedctl.jobs.specfile import SpecFileError
    from embedctl.shm_loader.errors import SegmentError

    try:
        yield
    except SpecFileError as exc:  # a job spec file: every error in it, one line each
        for line in exc.errors:
            click.echo(f"Error: {line}", err=True)
        sys.exit(1)
    except (EmbedctlError, SegmentError) as exc:
        raise click.ClickException(one_line(str(exc))) from None
    except PermissionError as exc:
        raise click.ClickException(f"permission denied: {exc.filename}; check the folder's owner and mode") \
            from None
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        if exc.errno == errno.EPIPE and stdout_gone():
            raise  # not a failure: the entry point ends the command quietly
        where = f" ({exc.filename})" if exc.filename else ""
        raise click.ClickException(one_line(f"{exc.strerror or exc}{where}")) from None


def env_option(*names, env: str, **kw):
    """A click option that also reads EMBEDCTL_<env> (shown in --help)."""
    return click.option(*names, envvar=f"EMBEDCTL_{env}", show_envvar=True, **kw)


def tqdm_progress(quiet: bool, terminal: bool | None = None):
    """A ProgressFactory showing tqdm bars on stderr when it is a terminal, one line per stage when it is not (a
    file or a pipe: cron, a CI log, where every redraw of a bar would be kept), nothing when quiet. `terminal`:
    whether stderr is one (default: ask it)."""
    if terminal is None:
        terminal = sys.stderr.isatty()

    @contextmanager
    def factory(desc: str, total: int, unit: str = "", initial: int = 0):
        if quiet:
            from embedctl.pipeline.progress import no_progress

            with no_progress(desc, total) as silent:
                yield silent
            return
        if not terminal:
            line = _Line(desc, total, unit, initial)
            yield line
            line.close()
            return
        from tqdm import tqdm

        with tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                  file=sys.stderr, smoothing=0.1, mininterval=0.5) as bar:
            yield _Bar(bar)

    return factory


class _Bar:
    """A tqdm bar as a progress callback: `bar(n)` advances, `bar.note(text)` shows a status after it."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def note(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)


class _Line:
    """A stage's progress as one line on stderr once the stage ends (`embed: 3000/3000 rows in 26.1 s, ...`)."""

    def __init__(self, desc: str, total: int, unit: str, initial: int):
        import time

        self.desc, self.total, self.unit, self.initial = desc, total, unit, initial
        self.done = initial
        self.text = ""
        self.t0 = time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n

    def note(self, text: str) -> None:
        self.text = text

    def close(self) -> None:
        import time

        seconds = time.monotonic() - self.t0
        unit = f" {self.unit}" if self.unit else ""
        before = f" ({self.initial} done before)" if self.initial else ""
        note = f", {self.text}" if self.text else ""
        click.echo(f"{self.desc}: {self.done}/{self.total}{unit}{before} in {seconds:.1f} s{note}", err=True)


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def print_rows(rows: list[dict], as_json: bool, empty: str, header: str, line: Callable[[dict], str]) -> None:
    """Rows as JSON, or as a table (`header`, then `line(row)` each), or `empty` when there are none."""
    if as_json:
        print_json(rows)
    elif not rows:
        click.echo(empty)
    else:
        click.echo(header)
        for row in rows:
            click.echo(line(row))


def run_options(broker_help: str, detach_help: str, json_help: str) -> Callable:
    """The options of a command that runs a job: `--broker`, `--detach`, `--quiet`, `--json`."""
    from embedctl.settings import BROKER_ENV

    def apply(func: Callable) -> Callable:
        for option in reversed((
                click.option("--broker", envvar=list(BROKER_ENV), show_envvar=True, default=None, help=broker_help),
                env_option("--detach", env="DETACH", is_flag=True, help=detach_help),
                env_option("--quiet", "-q", env="QUIET", is_flag=True, help="No progress bars."),
                env_option("--json", "as_json", env="JSON", is_flag=True, help=json_help))):
            func = option(func)
        return func

    return apply


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # transformers reads its verbosity when it is imported (only by commands that load a model): set it now
    # rather than importing it here, which would slow every command down.
    if verbose <= 1:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def parse_dims(_ctx, _param, value) -> tuple[int, ...] | None:
    """Click callback: '1024,512,256' -> (1024, 512, 256); None (not given) keeps the defaults."""
    if value is None or value == "":
        return None
    if isinstance(value, tuple | list):
        return tuple(value)
    try:
        dims = tuple(int(x) for x in str(value).replace(" ", "").split(",") if x)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 1024,512,256") from None
    if any(d <= 0 for d in dims):
        raise click.BadParameter(f"{value!r}: dims must be positive")
    return dims


def shm_option(func: Callable) -> Callable:
    """`--shm auto|require|off` (EMBEDCTL_SHM); EMBEDCTL_REQUIRE_SHM=1 makes it `require`."""

    def resolve(_ctx, _param, value: str) -> str:
        from embedctl.pipeline.loader import shm_mode

        return shm_mode(value)

    return click.option("--shm", type=click.Choice(["auto", "require", "off"]), default="auto", show_default=True,
                        envvar="EMBEDCTL_SHM", show_envvar=True, callback=resolve,
                        help="Weights from a published shared-memory segment: auto (when present), require, off. "
                             "EMBEDCTL_REQUIRE_SHM=1 means require.")(func)


def exported_devices(mode: str, dev, gpus: int, processes: int) -> list[str]:
    """The devices whose weights one exporter holds for the processes of a worker or server (see shm_loader/share.py):
    those its processes use (`pipeline.loader.process_device`)."""
    from embedctl.pipeline.loader import process_device
    from embedctl.shm_loader.share import exports

    devices = dict.fromkeys(process_device(str(dev), i, gpus) for i in range(max(1, processes)))
    return [d for d in devices if exports(mode, d)]


def _size(_ctx, _param, value: str | None) -> int | None:
    from embedctl.settings import parse_size

    try:
        return parse_size(value, "--cache-size")
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def cache_options(func: Callable) -> Callable:
    """`--cache-dir` and `--cache-size`: where the objects of an s3:// folder are cached on this host, and how large
    the cache may grow (least recently used files go first). Applied before the command runs."""

    def apply(ctx, _param, value):
        from embedctl.pipeline import s3

        ctx.ensure_object(dict)[_param.name] = value
        if "cache_dir" in ctx.obj and "cache_size" in ctx.obj:
            s3.configure_cache(ctx.obj["cache_dir"], ctx.obj["cache_size"], export=True)
        return value

    func = click.option("--cache-size", type=str, default=None, envvar="EMBEDCTL_CACHE_SIZE", show_envvar=True,
                        expose_value=False, is_eager=True,
                        callback=lambda ctx, p, v: apply(ctx, p, _size(ctx, p, v)),
                        help="Largest size of that cache (500M, 20G; default: unbounded).")(func)
    return click.option("--cache-dir", type=click.Path(file_okay=False), default=None, envvar="EMBEDCTL_CACHE_DIR",
                        show_envvar=True, expose_value=False, is_eager=True, callback=apply,
                        help="Where objects of s3:// folders are cached on this host [default: "
                             "~/.cache/embedctl/s3].")(func)
