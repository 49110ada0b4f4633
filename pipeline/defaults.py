"""Default values of every setting, one named constant each (see `jobs.spec.JobSpec`)."""

from __future__ import annotations

from embedctl.pipeline.errors import ConfigError

DEFAULT_MODEL = "Qwen/Qwen3-Embedding-4B"
"""Model used when `--model` is not given: the reference model of embedctl."""

DEFAULT_TEXT_COLUMN = "text"
"""Corpus column holding the text to embed."""

DEFAULT_ID_COLUMN = "id"
"""Corpus column holding the row ids; when the corpus has no such column, the row number is the id."""

DEFAULT_CHUNK_ROWS = 4096
"""Rows per chunk: the unit of work, of resume and of distribution to workers."""

DEFAULT_BATCH_TOKENS_CPU = 1024
"""Token budget of one forward batch on CPU (padded tokens). Small batches stay in the CPU caches."""

DEFAULT_BATCH_TOKENS_CUDA = 32768
"""Token budget of one forward batch on a CUDA device. Measured on an H100 with the Qwen3-Embedding-4B shape in
bf16 (`python -m bench.gpu`): 32k tokens ran glosses 1.09x faster than 16k, 64k no faster; activations at 32k
peak at about 7 GiB beside the 8 GiB of weights."""

MAX_LENGTH_CAP = 8192
"""Upper bound of the default `--max-length` (a model's own limit may be far larger)."""

DEFAULT_DIMS = (1024, 512, 256, 128)
"""Matryoshka dims indexed besides the full dim (those below the model's dim are kept)."""

DEFAULT_HNSW_M = 32
"""HNSW graph degree (`IndexHNSWFlat` M)."""

DEFAULT_EF_CONSTRUCTION = 200
"""HNSW efConstruction: candidate list size while building."""

DEFAULT_EF_SEARCH = 64
"""HNSW efSearch used by `embedctl query` unless `--ef` is given."""

DEFAULT_KEEP_VERSIONS = 3
"""Index versions kept in an output folder (the current one is never removed)."""

DEFAULT_TOP_K = 10
"""Results per query."""

DEFAULT_SHORTLIST = 200
"""Candidates per segment a funnel search (`query --funnel`) takes from the small dim's HNSW before its exact
full-dim re-rank. Measured (MiniLM, 20,000 WordNet glosses): 200 from the 128-dim slice re-ranked at 384 gives
recall@10 0.991 against exact 384-dim search, where the 384-dim HNSW gives 0.995 (on the 3,000-row sample's 855
queries: 0.9724, and 0.996 with 500; README, "Funnel search"). A longer shortlist costs efSearch (at least the
shortlist) and one row read from the vectors file per candidate."""

DEFAULT_QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
"""Query instruction of instruction-aware models (the Qwen3 embedding family) without prompts of their own."""

INSTRUCTION_TEMPLATE = "Instruct: {task}\nQuery:{text}"
"""How an instruction is put in front of a text (the Qwen3-Embedding format)."""

DTYPE_NAMES = ("fp32", "float32", "fp16", "float16", "bf16", "bfloat16")
"""Values of `--dtype` besides `auto` (fp32 on CPU, bf16 on CUDA)."""

INDEX_TYPES = ("hnsw", "hnsw-sqfp16", "hnsw-sq8")
"""`hnsw`: float32 vectors; `hnsw-sqfp16`: vectors in float16 (half the bytes); `hnsw-sq8`: 8 bits a dim (a quarter)."""

INSTRUCTION_FORMATS = ("qwen3", "raw")
"""`qwen3`: `Instruct: {task}\nQuery:` before the text; `raw`: the instruction itself is the prefix."""

DEFAULT_SEGMENT_ROWS = 500_000
"""Rows per index segment (`--segment-rows`): the unit of an index build task and of a re-index. Measured
(`python -m bench.segments`): search time grows about linearly with the number of segments while build time per
row barely depends on segment size, so segments are as large as a build task's memory allows on a common build
host: at the reference model's 2560 dims, 500,000 rows take 12.2 GiB for the full-dim piece (two tasks fit in
32 GB). See README, "Segments"."""

COMPILE_MODES = ("auto", "on", "off")
"""`--compile`: `on` compiles from the first batch, `off` never, `auto` (the default) switches to the compiled model
on CUDA once this process has spent `policy.compile_after_seconds()` in eager forward passes (see
`policy.compile_due`)."""


def compile_mode(value) -> str:
    """`--compile` as one of COMPILE_MODES (true/false from job specs and older plans are on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    mode = str(value or "auto").strip().lower()
    mode = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(mode, mode)
    if mode not in COMPILE_MODES:
        raise ConfigError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return mode
