"""The `embedctl` command line: a thin layer over `pipeline`, `jobs` and `shm_loader`."""

from __future__ import annotations

import click

from embedctl.cli.common import quiet_when_stdout_closes, setup_logging, user_errors
from embedctl.cli.index import index
from embedctl.cli.jobs import cache, jobs
from embedctl.cli.query import evaluate_cmd, info, query
from embedctl.cli.serve import serve
from embedctl.cli.shm import shm
from embedctl.cli.status import status
from embedctl.cli.verify import verify
from embedctl.cli.worker import worker


class _Main(click.Group):
    """The `embedctl` group: every command runs in `user_errors` (errors are mapped to one line and an exit code
    there only), and every command and the help end quietly when the reader of stdout goes away
    (`embedctl info | head -1`)."""

    def make_context(self, *args, **kwargs) -> click.Context:
        with quiet_when_stdout_closes():  # `embedctl --help` prints while its arguments are parsed
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        with quiet_when_stdout_closes(), user_errors():
            return super().invoke(ctx)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, envvar="EMBEDCTL_VERBOSE", show_envvar=True, help="Log more (-v info, -vv debug).")
@click.version_option(package_name="embedctl")
def main(verbose: int) -> None:
    """embedctl: batch text embedding into FAISS HNSW indexes (full dim plus Matryoshka slices)."""
    setup_logging(verbose)


main.add_command(index)
main.add_command(query)
main.add_command(info)
main.add_command(shm)
main.add_command(status)
main.add_command(worker)
main.add_command(jobs)
main.add_command(cache)
main.add_command(evaluate_cmd)
main.add_command(verify)
main.add_command(serve)
