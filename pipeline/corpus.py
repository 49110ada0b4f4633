"""Corpus: Parquet files (a file, a directory or a glob) read chunk by chunk.

`plan_corpus` validates the whole corpus before any embedding (columns, types, unique ids, texts that are UTF-8)
reading the footers, the id column and the text column, and splits the rows into chunks (global row ranges that
may span files). Text and id columns may be dictionary-encoded (their values are read).
`iter_chunks` then streams the chunks in order, reading each file once; `read_chunk` reads one chunk alone
(what a distributed worker does), reading only the row groups that hold its rows.

A corpus may be S3 objects (`s3://bucket/prefix/`, `s3://bucket/file.parquet`, `s3://bucket/dir/*.parquet`,
see `pipeline.s3files`): each is read by ranged GETs (its footer, then the row groups a read needs), and a file
of the plan is then the object's URI, its size and its ETag.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedctl.pipeline.errors import ConfigError, CorpusError
from embedctl.pipeline.s3files import ObjectFile, ObjectInfo, discover_objects, head
from embedctl.pipeline.storage import is_uri

LOG = logging.getLogger(__name__)

_READ_BATCH_ROWS = 8192
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class CorpusFile:
    """One Parquet file of the corpus and where its rows start in the corpus numbering."""

    path: str
    rows: int
    size: int
    mtime_ns: int
    row_offset: int
    footer: str = ""  # digest of the Parquet footer (schema, row groups, statistics)
    etag: str = ""  # an object's ETag ("" for a local file)

    def changes(self) -> str | None:
        """How the file differs from when it was planned (None: it is the same file)."""
        if is_uri(self.path):
            return self._object_changes()
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return "it is gone"
        except OSError as exc:
            return f"it cannot be read ({exc.strerror})"
        if stat.st_size != self.size:
            return f"{stat.st_size} bytes, {self.size} when planned"
        if stat.st_mtime_ns != self.mtime_ns:
            return "it was modified since"
        if self.footer:
            with open(self.path, "rb") as fh:
                if _footer_digest(fh).hex()[:32] != self.footer:
                    return "its Parquet footer changed"
        return None

    def _object_changes(self) -> str | None:
        """`changes` of an object: one HEAD, whose size and ETag say whether it was replaced."""
        now = head(self.path)
        if now is None:
            return "it is gone"
        if now.size != self.size:
            return f"{now.size} bytes, {self.size} when planned"
        if self.etag and now.etag != self.etag:
            return f"it was replaced since (ETag {now.etag}, {self.etag} when planned)"
        return None


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of the corpus: the unit of work, resume and distribution."""

    number: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class CorpusPlan:
    """A validated corpus: its files, columns, chunking and fingerprint."""

    source: str
    files: tuple[CorpusFile, ...]
    text_column: str
    id_column: str | None  # None: the row number is the id
    chunk_rows: int
    fingerprint: str

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def chunks(self) -> list[Chunk]:
        return [Chunk(k, start, min(start + self.chunk_rows, self.rows))
                for k, start in enumerate(range(0, self.rows, self.chunk_rows))]

    def to_dict(self) -> dict:
        return {**asdict(self), "files": [asdict(f) for f in self.files]}

    @classmethod
    def from_dict(cls, data: dict) -> CorpusPlan:
        return cls(**{**data, "files": tuple(CorpusFile(**f) for f in data["files"])})


@dataclass
class ChunkRows:
    """The rows of one chunk as read from the corpus (texts may be None or empty: they are skipped later)."""

    rows: np.ndarray  # int64 corpus row numbers
    ids: list
    texts: list


def discover_files(source: str) -> list[Path] | list[str]:
    """The Parquet files named by `source`: a file, a directory (searched recursively) or a glob, sorted; the
    URIs of the objects named by an `s3://` URI (`pipeline.s3files.discover_objects`)."""
    if is_uri(source):
        return [found.uri for found in discover_objects(source)]
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise CorpusError(f"no *.parquet files in directory {source!r}; point the corpus at Parquet files")
        return files
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
        if not files:
            raise CorpusError(f"no files match {source!r}; check the pattern (quote it so the shell does not expand it)")
        return files
    raise CorpusError(f"corpus {source!r} does not exist; give a Parquet file, a directory or a glob")


def _found(source: str) -> list[ObjectInfo]:
    """The corpus files as they are now: path or URI, size, mtime and ETag ("" for a local file)."""
    if is_uri(source):
        return discover_objects(source)
    found = []
    for path in discover_files(source):
        stat = path.stat()
        found.append(ObjectInfo(str(path.resolve()), stat.st_size, stat.st_mtime_ns, ""))
    return found


def _binary(path: str, size: int, etag: str = "") -> BinaryIO:
    """The bytes of a corpus file: the local file, or the object read by ranged GETs (of version `etag`)."""
    return ObjectFile(path, size, etag=etag) if is_uri(path) else open(path, "rb")


def _open(path: str, size: int = -1, raw: BinaryIO | None = None, etag: str = "") -> pq.ParquetFile:
    """A Parquet reader of a corpus file (`size`, `etag`: an object's, from the plan; `raw`: its bytes, already
    open)."""
    if is_uri(path):  # pyarrow reads the footer and the row groups it needs through ranged GETs
        path_or_file = pa.PythonFile(raw if raw is not None else ObjectFile(path, size, etag=etag), mode="r")
    else:
        path_or_file = path
    try:
        return pq.ParquetFile(path_or_file)
    except (OSError, pa.ArrowException) as exc:
        raise CorpusError(f"cannot read {path!r} as Parquet ({exc}); the corpus must be Parquet files") from None


def _footer_digest(fh: BinaryIO) -> bytes:
    """The Parquet footer (schema, row groups, statistics): part of the corpus fingerprint."""
    fh.seek(-8, os.SEEK_END)
    length = int.from_bytes(fh.read(4), "little")
    fh.seek(-8 - length, os.SEEK_END)
    return hashlib.sha256(fh.read(length)).digest()


def plan_corpus(source: str, text_column: str, id_column: str | None, chunk_rows: int,
                id_column_required: bool = False, validated: str | None = None) -> CorpusPlan:
    """Validate the corpus and split it into chunks, before any embedding.

    Args:
        source: a Parquet file, a directory of Parquet files or a glob; or an `s3://` URI of one of these.
        text_column: the column with the texts (string).
        id_column: the column with unique ids (string or integer); when absent from the corpus and not
            `id_column_required`, the row number is the id.
        chunk_rows: rows per chunk.
        validated: fingerprint of a corpus whose ids were already checked (an unchanged corpus is not re-read).

    Raises:
        CorpusError: missing file or column, wrong type, null or duplicate ids.
    """
    if chunk_rows <= 0:
        raise ConfigError(f"chunk_rows must be > 0, got {chunk_rows!r}")
    found = _found(source)
    files: list[CorpusFile] = []
    digest = hashlib.sha256()
    offset = 0
    use_ids: bool | None = None
    id_type: str | None = None
    for info in found:
        path = info.uri
        with _binary(path, info.size, info.etag) as raw:  # one GET of an object's tail serves both
            pf = _open(path, raw=raw)
            footer = _footer_digest(raw)
        schema = pf.schema_arrow
        names = schema.names
        if text_column not in names:
            raise CorpusError(f"column {text_column!r} is not in {path!r} (columns: {', '.join(names)}); "
                              "choose the text column with --text-column")
        text_type = schema.field(text_column).type
        if not _is_string(_values(text_type)):
            raise CorpusError(f"column {text_column!r} of {path!r} holds {text_type}, not strings; "
                              "choose a text column with --text-column")
        has_id = bool(id_column) and id_column in names
        if id_column and not has_id and id_column_required:
            raise CorpusError(f"id column {id_column!r} is not in {path!r} (columns: {', '.join(names)}); "
                              "choose it with --id-column")
        if use_ids is None:
            use_ids = has_id
        elif use_ids != has_id:
            raise CorpusError(f"id column {id_column!r} is in some corpus files but not in {path!r}; "
                              "every file needs the same columns")
        if has_id:
            this_type = schema.field(id_column).type
            if not (pa.types.is_integer(_values(this_type)) or pa.types.is_string(_values(this_type))
                    or pa.types.is_large_string(_values(this_type))):
                raise CorpusError(f"id column {id_column!r} of {path!r} holds {this_type}; ids must be strings "
                                  "or integers")
            family = "int" if pa.types.is_integer(_values(this_type)) else "str"
            if id_type is not None and family != id_type:
                raise CorpusError(f"id column {id_column!r} is {this_type} in {path!r} but not in the other "
                                  "files; every file needs the same id type")
            id_type = family
        rows = pf.metadata.num_rows
        files.append(CorpusFile(path, rows, info.size, info.mtime_ns, offset, footer.hex()[:32], info.etag))
        offset += rows
        version = info.etag or info.mtime_ns  # an object's ETag changes whenever it is replaced; its mtime may not
        digest.update(f"{path}\0{info.size}\0{version}\0{rows}\0".encode())
        digest.update(footer)
    if offset == 0:
        raise CorpusError(f"corpus {source!r} has no rows")
    plan = CorpusPlan(source=str(source), files=tuple(files), text_column=text_column,
                      id_column=id_column if use_ids else None, chunk_rows=int(chunk_rows),
                      fingerprint=digest.hexdigest()[:16])
    if plan.fingerprint != validated:
        if plan.id_column:
            _check_ids(plan)
        _check_texts(plan)
    return plan


def _values(type_: pa.DataType) -> pa.DataType:
    """The type of a column's values: a dictionary-encoded column holds its dictionary's."""
    return type_.value_type if pa.types.is_dictionary(type_) else type_


def _is_string(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_)


def _check_ids(plan: CorpusPlan) -> None:
    """Refuse null and duplicate ids (reads the id column only)."""
    columns = []
    for f in plan.files:
        col = _open(f.path, f.size, etag=f.etag).read(columns=[plan.id_column]).column(0)
        col = col.cast(_values(col.type))  # a dictionary's ids are its values
        nulls = col.null_count
        if nulls:
            first = int(pc.index(pc.is_null(col), True).as_py())
            raise CorpusError(f"{nulls} null ids in column {plan.id_column!r} of {f.path!r} (first at row {first}); "
                              "every row needs an id")
        if pa.types.is_unsigned_integer(col.type) and col.length() and pc.max(col).as_py() > _INT64_MAX:
            big = pc.max(col).as_py()
            raise CorpusError(f"id column {plan.id_column!r} of {f.path!r} holds {big}, above {_INT64_MAX}, the largest id "
                              "the vector store and FAISS hold (signed 64-bit); map the ids to smaller integers or "
                              "to strings")
        columns.extend(col.chunks)
    common = pa.int64() if pa.types.is_integer(columns[0].type) else pa.large_string()
    ids = pa.chunked_array([c.cast(common) for c in columns], type=common)
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))
        example = dup[0]["values"].as_py()
        raise CorpusError(f"{len(dup)} duplicate ids in column {plan.id_column!r} (e.g. {example!r} appears "
                          f"{dup[0]['counts'].as_py()} times); ids must be unique")


def _check_texts(plan: CorpusPlan) -> None:
    """Refuse texts that are not UTF-8 (reads the text column a batch at a time; Arrow checks the bytes in C++).

    Parquet strings are UTF-8 by specification, but a writer can store other bytes unchecked (a Latin-1 source
    copied as is, half of a UTF-16 surrogate pair). Such a row is refused, not skipped like a null text: its
    text exists but cannot be read as written, and guessing an encoding would embed a different text. The
    corpus is refused before any embedding, naming the file, the row and its id, so the writer can be fixed.
    """
    for f in plan.files:
        start = 0
        for batch in _open(f.path, f.size, etag=f.etag).iter_batches(batch_size=_READ_BATCH_ROWS, columns=[plan.text_column]):
            texts = batch.column(0)
            try:
                texts.validate(full=True)
            except pa.ArrowInvalid:
                found = _first_not_utf8(texts)
                if found is not None:  # else: an unused dictionary value
                    row = start + found[0]
                    raise _not_utf8(plan, f, row, _file_id(plan, f, row), found[1]) from None
            start += batch.num_rows


def _first_not_utf8(texts: pa.Array) -> tuple[int, UnicodeDecodeError] | None:
    """The position of the first text that is not UTF-8, and why (None: all are)."""
    if pa.types.is_dictionary(texts.type):
        texts = texts.dictionary_decode()
    for position, value in enumerate(texts.cast(pa.large_binary()).to_pylist()):
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as exc:
                return position, exc
    return None


def _file_id(plan: CorpusPlan, f: CorpusFile, row: int):
    """The id of row `row` of file `f` (its corpus row number when the corpus has no id column)."""
    if not plan.id_column:
        return f.row_offset + row
    return _open(f.path, f.size, etag=f.etag).read(columns=[plan.id_column]).column(0)[row].as_py()


def _not_utf8(plan: CorpusPlan, f: CorpusFile, row: int, id_, exc: UnicodeDecodeError) -> CorpusError:
    return CorpusError(f"column {plan.text_column!r} of {f.path!r} holds text that is not valid UTF-8 at row {row} "
                       f"(id {id_!r}): byte 0x{exc.object[exc.start]:02x} at offset {exc.start}; Parquet strings must "
                       "be UTF-8: fix the program that wrote the file (decode the source text with its real "
                       "encoding), then run again")


def _columns(plan: CorpusPlan) -> list[str]:
    return [plan.text_column] + ([plan.id_column] if plan.id_column else [])


def _read_range(plan: CorpusPlan, start: int, stop: int) -> Iterator[pa.RecordBatch]:
    """Record batches of corpus rows [start, stop), in order, across files."""
    for f in plan.files:
        lo, hi = max(start, f.row_offset), min(stop, f.row_offset + f.rows)
        if lo >= hi:
            continue
        change = f.changes()
        if change is not None:  # never mix two versions of the corpus in one job
            raise CorpusError(f"corpus file {f.path} changed since the job was planned ({change}); run the same "
                              "command again: it plans the corpus as it is now")
        pf = _open(f.path, f.size, etag=f.etag)
        groups, first = _row_groups(pf.metadata, lo - f.row_offset, hi - f.row_offset)
        pos = f.row_offset + first
        for batch in pf.iter_batches(batch_size=_READ_BATCH_ROWS, row_groups=groups, columns=_columns(plan)):
            b_lo, b_hi = max(lo - pos, 0), min(hi - pos, batch.num_rows)
            if b_lo < b_hi:
                yield _plain(batch.slice(b_lo, b_hi - b_lo))
            pos += batch.num_rows
            if pos >= hi:
                break


def _row_groups(metadata: pq.FileMetaData, lo: int, hi: int) -> tuple[list[int], int]:
    """The row groups that hold the file's rows [lo, hi), and the file row the first of them starts at: a chunk
    reads only those (from S3: only their byte ranges are fetched)."""
    groups, first, start = [], 0, 0
    for number in range(metadata.num_row_groups):
        stop = start + metadata.row_group(number).num_rows
        if start < hi and stop > lo:
            if not groups:
                first = start
            groups.append(number)
        start = stop
    return groups, first


def _plain(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A batch whose columns hold their values plainly (dictionaries decoded, strings as large strings), so that
    the batches of files that encode one column differently make one table."""
    columns = []
    for column in batch.columns:
        type_ = _values(column.type)
        if pa.types.is_string(type_):
            type_ = pa.large_string()
        columns.append(column if column.type == type_ else column.cast(type_))
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _to_rows(plan: CorpusPlan, start: int, batches: list[pa.RecordBatch]) -> ChunkRows:
    table = pa.Table.from_batches(batches) if batches else None
    n = table.num_rows if table is not None else 0
    rows = np.arange(start, start + n, dtype=np.int64)
    ids = table.column(plan.id_column).to_pylist() if plan.id_column and n else rows.tolist()
    try:
        texts = table.column(plan.text_column).to_pylist() if n else []
    except UnicodeDecodeError:  # a plan that did not read the texts (an unchanged corpus, another text column)
        position, exc = _first_not_utf8(table.column(plan.text_column).combine_chunks())
        row = start + position
        f = next(f for f in plan.files if f.row_offset <= row < f.row_offset + f.rows)
        raise _not_utf8(plan, f, row - f.row_offset, ids[position], exc) from None
    return ChunkRows(rows=rows, ids=ids, texts=texts)


def read_chunk(plan: CorpusPlan, chunk: Chunk) -> ChunkRows:
    """Read the rows of one chunk."""
    return _to_rows(plan, chunk.start, list(_read_range(plan, chunk.start, chunk.stop)))


def iter_chunks(plan: CorpusPlan, numbers: set[int] | None = None) -> Iterator[tuple[Chunk, ChunkRows]]:
    """Stream the chunks `numbers` (all when None) in order, reading the corpus once from the first wanted row."""
    chunks = [c for c in plan.chunks if numbers is None or c.number in numbers]
    if not chunks:
        return
    pending: list[pa.RecordBatch] = []
    it = iter(chunks)
    current = next(it)
    pos = chunks[0].start
    for batch in _read_range(plan, chunks[0].start, chunks[-1].stop):
        while batch.num_rows:
            if pos < current.start:  # rows of a chunk not wanted: skip them
                skip = min(current.start - pos, batch.num_rows)
                batch, pos = batch.slice(skip), pos + skip
                continue
            take = min(current.stop - pos, batch.num_rows)
            pending.append(batch.slice(0, take))
            batch, pos = batch.slice(take), pos + take
            if pos == current.stop:
                yield current, _to_rows(plan, current.start, pending)
                pending = []
                current = next(it, None)
                if current is None:
                    return
