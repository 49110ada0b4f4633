"""`embedctl status`: the state of a job, read from disk."""

from __future__ import annotations

import click

from embedctl.cli.common import cache_options, print_json
from embedctl.pipeline.storage import location


@click.command()
@click.argument("job", type=click.Path())
@click.option("--json", "as_json", is_flag=True, envvar="EMBEDCTL_JSON", help="Print the job state as JSON.")
@cache_options
def status(job: str, as_json: bool) -> None:
    """State of the newest job in an --out folder JOB (or of a job folder OUT/work/<job id>), read from disk."""
    from embedctl.jobs.state import status as job_status

    data = job_status(location(job))
    if as_json:
        print_json(data)
        return
    click.echo(f"job {data['job_id']} (run {data['run_id'] or '?'}, {data['mode'] or 'unknown'}, started "
               f"{data['submitted'] or '?'}): {data['state']}")
    click.echo(f"chunks {data['chunks_done']}/{data['chunks_total']}, rows {data['rows_done']}/{data['rows_total']}"
               + (f", published {data['version']}" if data["version"] else ""))
    for error in data["errors"]:
        click.echo(f"error: {error}")
