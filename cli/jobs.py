"""`embedctl jobs list|run|status` (named jobs of a spec file) and `embedctl cache prune`."""

from __future__ import annotations

import sys

import click

from embedctl.cli.common import cache_options, env_option, print_json, print_rows, run_options, tqdm_progress


def _jobs_option(func):
    return click.option("--jobs", "jobs_file", envvar="EMBEDCTL_JOBS", show_envvar=True, default=None,
                        help="The job spec file (TOML).")(func)


def _load(jobs_file: str | None):
    from embedctl.jobs.schedule import jobs_path
    from embedctl.jobs.specfile import load_jobs

    path = jobs_path(jobs_file)
    return path, load_jobs(path)


@click.group()
def jobs() -> None:
    """Named jobs of a spec file (EMBEDCTL_JOBS): list, run now, show their runs."""


@jobs.command("list")
@_jobs_option
@env_option("--json", "as_json", env="JSON", is_flag=True, help="Print the jobs as JSON.")
def list_jobs(jobs_file: str | None, as_json: bool) -> None:
    """List the jobs of the spec file with their schedule, corpus and output folder (validates the file)."""
    from embedctl.jobs.history import history

    _path, named = _load(jobs_file)
    rows = []
    for job in named.values():
        last = history(job.spec.out, limit=1)
        rows.append({**job.to_dict(), "last_run": last[0] if last else None})
    if as_json:
        print_json(rows)
        return
    for row in rows:
        last = row["last_run"]
        when = f"last run {last['started']} {last['status']}" if last else "never run"
        click.echo(f"{row['name']:<20} {row['schedule'] or 'manual':<14} {row['model']:<28} {row['out']}  ({when})")


@jobs.command("run")
@click.argument("name")
@_jobs_option
@run_options("Run on the Celery workers (default: in this process).", "With a broker: return once the run is queued.",
             "Print the run record as JSON.")
@cache_options
def run(name: str, jobs_file: str | None, broker: str | None, detach: bool, quiet: bool, as_json: bool) -> None:
    """Run job NAME now (embedded, or on the workers with a broker); skipped while another run of it is going."""
    from embedctl.jobs.schedule import jobs_path, load_named

    job = load_named(name, jobs_path(jobs_file))
    if broker:
        from embedctl.jobs.broker import Settings
        from embedctl.jobs.distributed import follow, submit_named
        from embedctl.jobs.report import RunReport

        started = submit_named(job, Settings.from_env(broker_url=broker), detach=detach)
        if not isinstance(started, RunReport) and started.report is None and detach:
            if as_json:
                print_json(started.to_dict())
            else:
                click.echo(f"{name}: running (run {started.run.run_id}); see `embedctl jobs status {name}`")
            return
        try:
            report = started if isinstance(started, RunReport) else follow(started, progress=tqdm_progress(quiet))
        except KeyboardInterrupt:
            click.echo(f"\ninterrupted: the run keeps going on the workers; see `embedctl jobs status {name}`",
                       err=True)
            sys.exit(130)
    else:
        from embedctl.jobs.runner import run_named

        report = run_named(job, progress=tqdm_progress(quiet))
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo(_describe(name, report))


def _describe(name: str, report) -> str:
    if report.status == "skipped":
        return f"{name}: skipped ({report.reason})"
    return (f"{name}: {report.status} {report.version or ''} — embedded {report.rows_embedded}, reused "
            f"{report.rows_reused}, deleted {report.rows_deleted} rows in {report.seconds} s")


@jobs.command("status")
@click.argument("name")
@_jobs_option
@env_option("--limit", "-n", env="RUNS_LIMIT", type=int, default=10, show_default=True, help="Runs shown, newest first.")
@env_option("--json", "as_json", env="JSON", is_flag=True, help="Print the runs as JSON.")
def job_status(name: str, jobs_file: str | None, limit: int, as_json: bool) -> None:
    """The last runs of job NAME, newest first: started, status, rows embedded/reused/deleted, seconds, version."""
    from embedctl.jobs.history import history
    from embedctl.jobs.schedule import jobs_path, load_named

    job = load_named(name, jobs_path(jobs_file))
    runs = history(job.spec.out, limit=limit)
    fields = ("run_id", "started", "status", "rows_embedded", "rows_reused", "rows_deleted", "seconds", "version",
              "mode", "reason", "error")
    print_rows([{k: r.get(k) for k in fields} for r in runs], as_json, f"{name}: no runs yet",
               f"{'started':<26} {'status':<11} {'embedded':>9} {'reused':>9} {'deleted':>8} {'seconds':>8}  version",
               lambda r: f"{r['started'] or '':<26} {r['status']:<11} {r['rows_embedded'] or 0:>9} "
                         f"{r['rows_reused'] or 0:>9} {r['rows_deleted'] or 0:>8} {r['seconds'] or 0:>8}  "
                         f"{r['version'] or r['reason'] or ''}")


@click.group()
def cache() -> None:
    """The embedding cache: stored vectors of an output folder, reused for unchanged texts."""


@cache.command()
@click.argument("out", type=click.Path(file_okay=False))
@env_option("--all", "all_", env="PRUNE_ALL", is_flag=True,
              help="Also drop the vectors of the current version (the next run embeds everything again).")
@env_option("--json", "as_json", env="JSON", is_flag=True, help="Print what was removed as JSON.")
@cache_options
def prune(out: str, all_: bool, as_json: bool) -> None:
    """Remove stored vectors of OUT that no published version needs (published versions stay servable)."""
    from embedctl.jobs.state import published_version
    from embedctl.pipeline.cache import prune as prune_stores

    removed, freed = prune_stores(out, everything=all_, published=published_version)
    result = {"removed": removed, "bytes_freed": freed}
    if as_json:
        print_json(result)
    else:
        click.echo(f"removed {len(removed)} vector store(s), {freed / 2**20:.1f} MiB freed")
