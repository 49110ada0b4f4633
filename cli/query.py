"""`embedctl query` and `embedctl info`: search a published index, describe it."""

from __future__ import annotations

import codecs
import shutil
import sys
from pathlib import Path

import click

from embedctl.cli.common import cache_options, env_option, parse_dims, print_json, shm_option
from embedctl.pipeline import defaults
from embedctl.pipeline.errors import ConfigError
from embedctl.pipeline.manifest import read_info
from embedctl.pipeline.storage import join, location
from embedctl.pipeline.versions import resolve_index_dir, version_folder


def no_verify_option(func):
    """`--no-verify` (EMBEDCTL_NO_VERIFY): skip the checksums of the index files (see `python -m bench.verify`)."""
    return env_option("--no-verify", env="NO_VERIFY", is_flag=True,
                      help="Do not check the index files against their checksums before using them.")(func)


def _undecodable(text: str) -> str | None:
    """Where an argument holds bytes the locale could not decode (Python keeps them as lone surrogates), or None."""
    for position, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            what = f"byte 0x{ord(char) - 0xDC00:02x}" if char >= "\udc80" else f"a lone surrogate U+{ord(char):04X}"
            return f"{what} at character {position + 1}"
    return None


def _read_query_file(file: str) -> list[str]:
    """The queries of a UTF-8 text file, one a line (a leading byte order mark is dropped)."""
    try:
        data = Path(file).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read --file {file!r}: {exc.strerror}") from None
    if data.startswith(b"PAR1"):
        raise ConfigError(f"--file {file!r} is a Parquet file; give a text file with one query a line (eval "
                          "--queries reads labelled queries from Parquet)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"--file {file!r} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save "
                          "it as UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > queries.txt") from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ConfigError(f"--file {file!r} holds NUL bytes (line {line}): UTF-16 or binary? save the queries as "
                          "UTF-8 text, one a line")
    queries = [q for q in (line.strip() for line in text.splitlines()) if q]
    if not queries:
        raise ConfigError(f"--file {file!r} holds no queries (one query a line)")
    return queries


def _read_queries(texts: tuple[str, ...], file: str | None) -> list[str]:
    if file and texts:
        raise click.UsageError("give query texts or --file, not both")
    if file:
        return _read_query_file(file)
    if not texts:
        raise click.UsageError("give a query text or --file FILE")
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise ConfigError(f"query {number} is empty; give a text to search for")
        where = _undecodable(text)
        if where is not None:  # argv bytes the locale cannot decode (Latin-1 in a UTF-8 shell): Python keeps them
            encoding = codecs.lookup(sys.getfilesystemencoding()).name.upper()  # as lone surrogates
            raise ConfigError(f"query {number} is not valid {encoding} ({where}); give it in {encoding}, the "
                              f"encoding of this locale (convert it with iconv -t {encoding})")
    return list(texts)


def funnel_options(func):
    """`--funnel DIM` (EMBEDCTL_FUNNEL) and `--shortlist N` (EMBEDCTL_SHORTLIST): a funnel search."""
    func = env_option("--shortlist", env="SHORTLIST", type=int, default=None,
                      help=f"Candidates per segment the funnel re-ranks [default: {defaults.DEFAULT_SHORTLIST}, "
                           "measured: README, Funnel search].")(func)
    return env_option("--funnel", env="FUNNEL", type=int, default=None,
                      help="Funnel search: shortlist in this dim's HNSW, re-rank exactly at the full dim with the "
                           "segments' full vectors (read from disk); scores are full-dim cosines.")(func)


def _check_funnel_options(ctx: click.Context, funnel: int | None, shortlist: int | None, dim: int | None) -> None:
    """Options that do not go with a funnel (or without one) are usage errors."""
    if funnel is None:
        given = ctx.get_parameter_source("shortlist") == click.core.ParameterSource.COMMANDLINE
        if shortlist is not None and given:
            raise click.UsageError("--shortlist needs --funnel DIM (the dim whose HNSW shortlists)")
        return
    if dim is not None:
        raise click.UsageError("give --dim or --funnel, not both: a funnel searches --funnel's dim and re-ranks at "
                               "the full dim")
    if funnel <= 0 or (shortlist is not None and shortlist <= 0):
        raise ConfigError(f"--funnel and --shortlist must be > 0, got {funnel!r} and {shortlist!r}")


def server_options(func):
    """`--server URL` (EMBEDCTL_SERVER) and `--api-key` (EMBEDCTL_API_KEY): use a running `embedctl serve`."""
    func = env_option("--api-key", env="API_KEY", default=None, help="The server's --api-key.")(func)
    return env_option("--server", env="SERVER", default=None,
                      help="URL of a running `embedctl serve` that serves this index: nothing is loaded here.")(func)


@click.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("texts", nargs=-1)
@click.option("-k", "k", type=int, default=defaults.DEFAULT_TOP_K, show_default=True, envvar="EMBEDCTL_K",
              show_envvar=True, help="Results per query.")
@env_option("--dim", env="DIM", type=int, default=None, help="Index dim to search [default: the full dim].")
@env_option("--ef", env="EF", type=int, default=None, help="HNSW efSearch [default: the index's, 64].")
@funnel_options
@env_option("--query-instruction", env="QUERY_INSTRUCTION", default=None,
      help="Instruction for the queries [default: the one recorded in the index; '' for none].")
@env_option("--file", "file", env="QUERY_FILE", default=None, help="Read queries from a file, one a line.")
@env_option("--device", env="DEVICE", default="auto", show_default=True)
@shm_option
@no_verify_option
@server_options
@env_option("--json", "as_json", env="JSON", is_flag=True, help="Print a list of {id, score, text} per query.")
@cache_options
@click.pass_context
def query(ctx: click.Context, index_dir: str, texts: tuple[str, ...], k: int, dim: int | None, ef: int | None,
          funnel: int | None, shortlist: int | None, query_instruction: str | None, file: str | None, device: str,
          shm: str, no_verify: bool, server: str | None, api_key: str | None, as_json: bool) -> None:
    """Search INDEX_DIR (an --out folder or a version folder) for TEXTS, embedded with the index's model.

    With --server the search runs in a running `embedctl serve` that serves INDEX_DIR (named by its folder name).
    With --funnel DIM: shortlist in DIM's HNSW, re-rank exactly at the full dim from the segments' vectors files
    (here, or in the server)."""
    _check_funnel_options(ctx, funnel, shortlist, dim)
    queries = _read_queries(texts, file)
    if k <= 0:
        raise ConfigError(f"-k must be > 0, got {k!r}")
    if server:
        from embedctl.jobs.client import ServerClient

        answer = ServerClient(server, api_key).search(Path(index_dir).resolve().name, queries, k, dim, ef,
                                                      query_instruction, funnel, shortlist)
        results = [item["hits"] for item in answer["data"]]
    else:
        results = [[hit.to_dict() for hit in hits]
                   for hits in _search_here(index_dir, queries, k, dim, ef, query_instruction, device, shm, no_verify,
                                            funnel, shortlist)]
    if as_json:
        print_json(results if file or len(queries) > 1 else results[0])
        return
    width = shutil.get_terminal_size((110, 20)).columns
    for text, hits in zip(queries, results, strict=True):
        if len(queries) > 1:
            click.echo(f"\nquery: {text}")
        id_width = max([len(str(h["id"])) for h in hits] + [2])
        click.echo(f"{'rank':>4}  {'score':>6}  {'id':<{id_width}}  text")
        for rank, hit in enumerate(hits, 1):
            room = max(width - id_width - 18, 20)
            shown = hit["text"] if len(hit["text"]) <= room else hit["text"][:room - 1] + "…"
            click.echo(f"{rank:>4}  {hit['score']:6.4f}  {hit['id']!s:<{id_width}}  {shown}")


def _search_here(index_dir: str, queries: list[str], k: int, dim: int | None, ef: int | None,
                 query_instruction: str | None, device: str, shm: str, no_verify: bool, funnel: int | None = None,
                 shortlist: int | None = None):
    """Load the index and its model in this process and search (a funnel is checked before the model loads)."""
    from embedctl.pipeline.index import IndexReader

    reader = IndexReader(location(index_dir), verify=not no_verify, fetch_rows=False)  # a few rows: by ranges
    shortlist = shortlist or defaults.DEFAULT_SHORTLIST
    if funnel is not None:
        reader.check_funnel(funnel, k, shortlist, index_dir)
    if dim is not None and dim not in reader.dims:
        raise ConfigError(f"--dim {dim} is not indexed in {index_dir}; choose one of "
                          f"{', '.join(map(str, reader.dims))}")
    from embedctl.pipeline.encoder import load_encoder  # torch is imported only when a query is embedded

    info = reader.info
    encoder = load_encoder(info.model_ref(), device=device, max_length=info.max_length, shm=shm)
    vectors = encoder.encode(queries, prefix=info.query_prefix_for(query_instruction)).vectors
    return reader.search(vectors, k=k, dim=dim, ef=ef, funnel=funnel, shortlist=shortlist)


@click.command()
@click.argument("index_dir", type=click.Path(file_okay=False))
@env_option("--json", "as_json", env="JSON", is_flag=True, help="Print the index info as JSON.")
@cache_options
def info(index_dir: str, as_json: bool) -> None:
    """Describe the index published in INDEX_DIR: model, dims, rows, version, files."""
    version_dir = resolve_index_dir(location(index_dir))
    info = read_info(version_dir)
    storage = version_folder(version_dir).storage
    segments = [{"id": ref.id, "rows": ref.rows, "deleted": ref.deleted, "folder": storage.describe(ref.prefix),
                 "files": {name: storage.describe(join(ref.prefix, name)) for name in ref.files}}
                for ref in info.segments]
    version = version_folder(version_dir)
    data = {**info.to_dict(), "version": version.name, "path": str(version_dir) if isinstance(version_dir, Path)
            else storage.describe(version.key), "paths": {"segments": segments}}
    if as_json:
        print_json(data)
        return
    click.echo(f"index    {data['path']} ({data['version']}, created {info.created})")
    click.echo(f"model    {info.model} ({info.model_type}, {info.pooling} pooling, dim {info.dim}, computed in "
               f"{info.dtype})")
    click.echo(f"rows     {info.rows} of {info.corpus.rows} corpus rows ({info.corpus.source})")
    click.echo(f"dims     {', '.join(map(str, info.dims))} ({info.index_type}, HNSW M={info.hnsw['m']}, "
               f"efConstruction={info.hnsw['ef_construction']}, efSearch={info.hnsw['ef_search']})"
               + ("" if info.dim in info.dims else f"; full dim {info.dim}: vectors only (--keep-full), for --funnel"))
    click.echo(f"query    instruction prefix {info.query_prefix!r} ({info.instruction_format} format)")
    click.echo(f"segments {len(segments)}, at most {info.segment_rows or '-'} rows each")
    for segment in segments[:10]:
        click.echo(f"         {segment['folder']}: {segment['rows']} rows, {segment['deleted']} deleted")
    if len(segments) > 10:
        click.echo(f"         ... and {len(segments) - 10} more (--json lists them)")


@click.command("eval")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--queries", "queries_path", required=True, envvar="EMBEDCTL_QUERIES", show_envvar=True,
              type=click.Path(dir_okay=False), help="Parquet file of queries with the id of their relevant row.")
@env_option("--query-column", env="QUERY_COLUMN", default="query", show_default=True, help="Column of the query texts.")
@env_option("--relevant-column", env="RELEVANT_COLUMN", default="relevant_id", show_default=True,
            help="Column of the id of each query's relevant row.")
@env_option("-k", "ks", env="EVAL_K", default="1,10", show_default=True, help="Comma-separated cut-offs for recall@k.")
@env_option("--ef", env="EF", type=int, default=None, help="HNSW efSearch [default: the index's].")
@env_option("--limit", env="EVAL_LIMIT", type=int, default=None, help="Evaluate only the first N queries.")
@env_option("--funnel", env="EVAL_FUNNEL", default=None, callback=parse_dims,
            help="Comma-separated dims: measure a funnel from each (shortlist in its HNSW, exact re-rank at the full "
                 "dim) beside plain HNSW.")
@env_option("--shortlist", env="SHORTLIST", type=int, default=None,
            help=f"Candidates per segment the funnel re-ranks [default: {defaults.DEFAULT_SHORTLIST}].")
@env_option("--query-instruction", env="QUERY_INSTRUCTION", default=None,
      help="Instruction for the queries [default: the one recorded in the index; '' for none].")
@env_option("--device", env="DEVICE", default="auto", show_default=True)
@env_option("--exact-device", env="EXACT_DEVICE", type=click.Choice(["auto", "cpu", "gpu"]), default="auto",
            show_default=True, help="Where the exact search runs: the GPU through faiss-gpu (the gpu extra) or the "
                                    "CPU; auto: the GPU when faiss-gpu sees one.")
@shm_option
@no_verify_option
@server_options
@env_option("--json", "as_json", env="JSON", is_flag=True, help="Print the metrics as JSON.")
@cache_options
def evaluate_cmd(index_dir: str, queries_path: str, query_column: str, relevant_column: str, ks: str,
                 ef: int | None, limit: int | None, funnel: tuple[int, ...] | None, shortlist: int | None,
                 query_instruction: str | None, device: str, exact_device: str,
                 shm: str, no_verify: bool, server: str | None, api_key: str | None, as_json: bool) -> None:
    """Recall@k and MRR of INDEX_DIR on labelled queries, per dim, exact search vs HNSW.

    With --server the queries are embedded by a running `embedctl serve` of the index's model (no model is loaded
    here; the index is searched here, exactly and with HNSW). The exact search runs on --exact-device."""
    from embedctl.pipeline.evaluate import evaluate, load_queries
    from embedctl.pipeline.exact import resolve_exact_device
    from embedctl.pipeline.index import IndexReader

    try:
        cutoffs = tuple(int(x) for x in ks.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{ks!r} is not a comma-separated list of integers", param_hint="-k") from None
    # a refused gpu fails before any index or model is loaded
    exact_device = resolve_exact_device(exact_device, max(cutoffs, default=1))
    if shortlist is not None and shortlist <= 0:
        raise ConfigError(f"--shortlist must be > 0, got {shortlist!r}")
    shortlist = shortlist or defaults.DEFAULT_SHORTLIST
    reader = IndexReader(location(index_dir), verify=not no_verify)
    for dim in funnel or ():  # before the model loads
        reader.check_funnel(dim, max(cutoffs, default=1), shortlist, index_dir)
    queries = load_queries(Path(queries_path), query_column, relevant_column, reader, limit=limit)
    info = reader.info
    prefix = info.query_prefix_for(query_instruction)
    if server:
        from embedctl.jobs.client import ServerClient

        client = ServerClient(server, api_key)
        served = client.model()
        if served.get("fingerprint") != info.model_fingerprint:
            raise ConfigError(f"the server at {server} serves {served.get('id')!r}, but {index_dir} was built with "
                              f"{info.model!r}; evaluate against a server of that model")
        vectors = client.embed(queries.texts, served["id"], prefix)
    else:
        from embedctl.pipeline.encoder import load_encoder

        encoder = load_encoder(info.model_ref(), device=device, max_length=info.max_length, shm=shm)
        vectors = encoder.encode(queries.texts, prefix=prefix).vectors
    result = evaluate(reader, vectors, queries, cutoffs, ef=ef, exact_device=exact_device, funnel=tuple(funnel or ()),
                      shortlist=shortlist)
    if as_json:
        print_json(result)
        return
    k = max(cutoffs)
    click.echo(f"{result['queries']} queries, {reader.dir.name} of {index_dir}")
    click.echo("exact search on gpu (faiss-gpu)" if result["exact_device"] == "gpu" else "exact search on cpu")
    head = "  ".join(f"{'R@' + str(c):>7}" for c in cutoffs)
    click.echo(f"{'dim':>5}  {'search':<6} {head} {'MRR@' + str(k):>8}   HNSW vs exact")
    full = result["full_dim"]
    for dim, m in result["dims"].items():
        for kind in ("exact", "hnsw", "funnel"):
            if kind not in m:
                continue
            cells = "  ".join(f"{m[kind][f'recall@{c}']:>7.4f}" for c in cutoffs)
            extra = f"   {m[f'hnsw_recall@{k}_vs_exact']:.4f} (ef {m['ef_search']})" if kind == "hnsw" else ""
            if kind == "funnel":
                extra = (f"   {m[f'funnel_recall@{k}_vs_exact_{full}']:.4f} (vs exact {full}, shortlist "
                         f"{m['shortlist']})")
            click.echo(f"{dim:>5}  {kind:<6} {cells} {m[kind][f'mrr@{k}']:>8.4f}{extra}")
