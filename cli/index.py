"""`embedctl index`: embed a corpus and publish its indexes."""

from __future__ import annotations

import sys

import click

from embedctl.cli.common import (
    cache_options,
    env_option,
    parse_dims,
    print_json,
    run_options,
    shm_option,
    tqdm_progress,
)
from embedctl.jobs.interrupts import InterruptedAfterPublish
from embedctl.jobs.spec import JobSpec
from embedctl.pipeline import defaults


@click.command()
@click.argument("corpus", envvar="EMBEDCTL_CORPUS")
@env_option("--out", "-o", env="OUT", required=True, help="Output folder: vectors, index versions, `current` pointer.")
@env_option("--model", "-m", env="MODEL", default=defaults.DEFAULT_MODEL, show_default=True,
      help="Alias (minilm, qwen3-0.6b, qwen3-4b, qwen3-8b), model folder or Hugging Face hub id.")
@env_option("--text-column", env="TEXT_COLUMN", default=defaults.DEFAULT_TEXT_COLUMN, show_default=True)
@env_option("--id-column", env="ID_COLUMN", default=defaults.DEFAULT_ID_COLUMN, show_default=True,
      help="Unique ids; when the default column is absent, row numbers are the ids.")
@env_option("--instruction", env="INSTRUCTION", default=None,
      help="Instruction for the documents; default: none.")
@env_option("--query-instruction", env="QUERY_INSTRUCTION", default=None,
      help="Instruction recorded for queries; default: the model's own ('' for none).")
@env_option("--instruction-format", env="INSTRUCTION_FORMAT", type=click.Choice(["qwen3", "raw"]), default=None,
      help="qwen3: 'Instruct: {instruction}\\nQuery:' before the text; raw: the instruction itself is the prefix "
           "(E5's 'query: '). [default: qwen3 for instruction-aware models, raw otherwise]")
@env_option("--dims", env="DIMS", default=None, callback=parse_dims,
      help=f"Matryoshka dims indexed besides the full dim; each must be at most the model's dim. [default: those of "
           f"{','.join(map(str, defaults.DEFAULT_DIMS))} below the model's dim]")
@env_option("--keep-full", env="KEEP_FULL", is_flag=True,
            help="Build HNSW indexes for --dims only, none for the full dim; the full-dim vectors stay on disk (each "
                 "segment's vectors file, which every build writes) for `query --funnel`.")
@env_option("--chunk-rows", env="CHUNK_ROWS", type=int, default=defaults.DEFAULT_CHUNK_ROWS, show_default=True,
      help="Rows per chunk (unit of resume and of distribution).")
@env_option("--batch-tokens", env="BATCH_TOKENS", type=int, default=None,
      help=f"Padded tokens per forward batch [default: {defaults.DEFAULT_BATCH_TOKENS_CPU} on CPU, "
           f"{defaults.DEFAULT_BATCH_TOKENS_CUDA} on CUDA].")
@env_option("--max-length", env="MAX_LENGTH", type=int, default=None,
      help=f"Truncate texts at this many tokens [default: the model's limit, at most {defaults.MAX_LENGTH_CAP}].")
@env_option("--dtype", env="DTYPE", default="auto", show_default=True, help="auto (fp32 on CPU, bf16 on CUDA), fp32, fp16, bf16.")
@env_option("--device", env="DEVICE", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@env_option("--threads", env="THREADS", type=int, default=None, help="Intra-op CPU threads [default: torch's].")
@env_option("--compile/--no-compile", "compile_model", env="COMPILE", default=None,
            help="torch.compile from the first batch / never. Neither: compile on CUDA once a process has spent "
                 "EMBEDCTL_COMPILE_AFTER (175) s in eager forward passes (the measured compile time).")
@env_option("--hnsw-m", env="HNSW_M", type=int, default=defaults.DEFAULT_HNSW_M, show_default=True)
@env_option("--ef-construction", env="EF_CONSTRUCTION", type=int, default=defaults.DEFAULT_EF_CONSTRUCTION, show_default=True)
@env_option("--ef-search", env="EF_SEARCH", type=int, default=defaults.DEFAULT_EF_SEARCH, show_default=True,
      help="efSearch stored in the indexes (queries may override with --ef).")
@env_option("--index-type", env="INDEX_TYPE", type=click.Choice(["hnsw", "hnsw-sqfp16", "hnsw-sq8"]), default="hnsw",
      show_default=True, help="Vector storage of the HNSW indexes: float32, float16 (1/2 the bytes), 8-bit (1/4).")
@env_option("--segment-rows", env="SEGMENT_ROWS", type=int, default=defaults.DEFAULT_SEGMENT_ROWS,
            show_default=True, help="The most rows an index segment holds: the unit of a build task and of a re-index.")
@env_option("--keep", env="KEEP", type=int, default=defaults.DEFAULT_KEEP_VERSIONS, show_default=True,
      help="Index versions kept in --out (older ones are removed; the current one never).")
@shm_option
@run_options("Redis URL: fan the chunks out to Celery workers (default: run in this process).",
             "With --broker: print the job id and return at once.", "Print the run report as JSON.")
@cache_options
def index(corpus: str, out: str, model: str, text_column: str, id_column: str, instruction: str | None,
          query_instruction: str | None, instruction_format: str | None, dims: tuple[int, ...] | None,
          keep_full: bool, chunk_rows: int, batch_tokens: int | None,
          max_length: int | None, dtype: str, device: str, threads: int | None, compile_model: bool | None, hnsw_m: int,
          ef_construction: int, ef_search: int, index_type: str, segment_rows: int, keep: int, shm: str,
          broker: str | None, detach: bool, quiet: bool, as_json: bool) -> None:
    """Embed CORPUS (Parquet file, directory or glob) and publish FAISS HNSW indexes in --out.

    Re-running the same command resumes: complete chunks are not embedded again, and a job whose published
    version is up to date does nothing.
    """
    spec = JobSpec(corpus=corpus, out=out, model=model, text_column=text_column, id_column=id_column,
                   instruction=instruction, query_instruction=query_instruction,
                   instruction_format=instruction_format, dims=dims, keep_full=keep_full, chunk_rows=chunk_rows,
                   batch_tokens=batch_tokens, max_length=max_length, dtype=dtype, device=device, threads=threads,
                   hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search, index_type=index_type,
                   segment_rows=segment_rows, keep=keep,
                   shm=shm, compile="auto" if compile_model is None else compile_model)
    if detach and not broker:
        raise click.UsageError("--detach needs --broker (or EMBEDCTL_BROKER_URL): an embedded run cannot detach")
    if broker:
        report = _distributed(spec, broker, detach, quiet, as_json)
        if report is None:
            return
    else:
        from embedctl.jobs.runner import run_embedded

        try:
            report = run_embedded(spec, progress=tqdm_progress(quiet))
        except InterruptedAfterPublish as exc:
            _interrupted_after_publish(exc.report)
        except KeyboardInterrupt:
            click.echo("\ninterrupted: complete chunks are kept; run the same command again to resume", err=True)
            sys.exit(130)
    try:
        if as_json:
            print_json(report.to_dict())
        else:
            click.echo(summary(report))
    except KeyboardInterrupt:
        _interrupted_after_publish(report)


def _interrupted_after_publish(report) -> None:
    """Ctrl-C once the run had ended: say what it did (a published version is complete and current), exit 130."""
    done = (f"{report.version} of {report.out} is published and current ({report.rows_indexed} rows)"
            if report.status == "published" else f"the run had ended ({report.status})")
    click.echo(f"\ninterrupted after the run: {done}; nothing to resume", err=True)
    sys.exit(130)


def summary(report) -> str:
    """The human summary of a run report (the same for embedded and distributed runs)."""
    out = report.out
    if report.status == "up-to-date":
        return (f"up to date: {report.version} of {out} already indexes this corpus ({report.rows_indexed} rows); "
                "nothing embedded")
    lines = [f"published {report.version} in {out}: {report.rows_indexed} rows indexed, dims "
             f"{', '.join(map(str, report.dims))}; embedded {report.rows_embedded} rows in {report.chunks_embedded} "
             f"chunks ({report.chunks_done_before} were complete)"
             + (f", reused {report.rows_reused} cached vectors" if report.rows_reused else "")]
    if report.rows_skipped:
        lines.append(f"skipped {report.rows_skipped} null or empty texts (listed in --json and "
                     f"{out}/work/{report.job_id}/report.json)")
    if report.rows_truncated:
        lines.append(f"truncated {report.rows_truncated} texts at the model's length limit (--max-length)")
    if report.requests:
        r = report.requests
        lines.append(f"object store: {r.get('GET', 0)} GET, {r.get('PUT', 0)} PUT, {r.get('LIST', 0)} LIST, "
                     f"{r.get('HEAD', 0)} HEAD, {r.get('DELETE', 0)} DELETE requests; "
                     f"{r.get('bytes_up', 0) / 2**20:.1f} MiB up, {r.get('bytes_down', 0) / 2**20:.1f} MiB down")
    return "\n".join(lines)


def _distributed(spec: JobSpec, broker: str, detach: bool, quiet: bool, as_json: bool):
    """Submit to Celery workers; follow to the publish unless detached (then print the run and return None)."""
    from embedctl.jobs.broker import Settings
    from embedctl.jobs.distributed import follow, submit

    submitted = submit(spec, Settings.from_env(broker_url=broker), detach=detach)
    if submitted.report is not None:
        return submitted.report
    if detach:
        if as_json:
            print_json(submitted.to_dict())
        else:
            click.echo(f"submitted job {submitted.plan.plan_id} (run {submitted.run.run_id}): {len(submitted.missing)} "
                       f"chunks queued ({len(submitted.plan.corpus.chunks) - len(submitted.missing)} already "
                       f"complete); follow it with `embedctl status {spec.out}`")
        return None
    try:
        return follow(submitted, progress=tqdm_progress(quiet))
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: job {submitted.plan.plan_id} keeps running on the workers; follow it with "
                   f"`embedctl status {spec.out}`", err=True)
        sys.exit(130)
