"""`embedctl verify`: check an output folder against its checksums, and repair it."""

from __future__ import annotations

import sys

import click

from embedctl.cli.common import cache_options, env_option, print_json, shm_option, tqdm_progress
from embedctl.pipeline.storage import location


@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@env_option("--repair", env="REPAIR", is_flag=True,
            help="Embed damaged chunks again and publish a new version built from sound vectors.")
@env_option("--quiet", "-q", env="QUIET", is_flag=True, help="No progress bars.")
@shm_option
@env_option("--json", "as_json", env="JSON", is_flag=True, help="Print what was checked (and repaired) as JSON.")
@cache_options
def verify(out: str, repair: bool, quiet: bool, shm: str, as_json: bool) -> None:
    """Check every file of OUT's current version and of its stored vectors against their checksums.

    Exit 0 when nothing is damaged (or --repair mended it), 1 when something is.
    """
    from embedctl.jobs.verify import check
    from embedctl.shm_loader.segment import human_bytes

    if repair:
        from embedctl.jobs.runner import repair as run_repair

        found, report = run_repair(location(out), progress=tqdm_progress(quiet), shm=shm)
    else:
        found, report = check(location(out)), None
    if as_json:
        print_json({"check": found.to_dict(), "repair": report.to_dict() if report else None})
    else:
        what = f"{found.version} of {out}" if found.version else out
        click.echo(f"checked {what}: {found.files} version files and {found.chunks} stored chunks "
                   f"({human_bytes(found.bytes)}) in {found.seconds:.2f} s"
                   + (": nothing is damaged" if found.ok else ""))
        for note in found.notes:
            click.echo(f"note     {note}")
        for damage in found.damaged:
            click.echo(f"damaged  {damage.path}: {damage.problem}")
        if report is not None:
            click.echo(f"repaired: published {report.version} in {out} ({report.rows_embedded} rows embedded again, "
                       f"{report.rows_indexed} rows indexed)")
        elif not found.ok:
            click.echo(f"{len(found.damaged)} damaged; repair with `embedctl verify {out} --repair`")
    if not found.ok and report is None:
        sys.exit(1)
