"""The encoder: texts in, L2-normalised float32 vectors out, in input order.

Texts are de-duplicated, tokenised, sorted by token length and packed into batches by a token budget (padded
tokens per forward pass, like text-embeddings-inference's `--max-batch-tokens`), so short texts fill big
batches and long ones do not run out of memory. Pooling follows the model profile: mean over the attention
mask, the CLS token, or the last token (decoder-only models, left padding, an end-of-text token appended when
the tokenizer does not append one).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedctl.pipeline import packing
from embedctl.pipeline.attention import use_embedctl_attention
from embedctl.pipeline.defaults import DEFAULT_BATCH_TOKENS_CPU, DEFAULT_BATCH_TOKENS_CUDA, compile_mode
from embedctl.pipeline.errors import ConfigError, ModelError, WeightsLost
from embedctl.pipeline.kernels import use_onednn_linear, use_pytorch_linear
from embedctl.pipeline.models import ModelProfile, ModelRef, read_profile

LOG = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
"""Names accepted by `--dtype` (besides `auto`)."""


def resolve_device(device: str) -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: no CUDA device is available here; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` computes in fp32 on CPU and in bf16 (fp16 where bf16 is unsupported) on CUDA."""
    if dtype in ("", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, {', '.join(sorted(DTYPES))}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a torch dtype (fp32, fp16, bf16)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def default_batch_tokens(device: torch.device) -> int:
    """Token budget that suits the device: small on CPU (caches), large on GPUs."""
    return DEFAULT_BATCH_TOKENS_CUDA if device.type == "cuda" else DEFAULT_BATCH_TOKENS_CPU


_EAGER_SECONDS = "_embedctl_eager_seconds"
"""Attribute of a model: forward seconds its encoders spent uncompiled in this process (`--compile auto`)."""

_BUDGET_THAT_FITS = "_embedctl_budget_that_fits"
"""Attribute of a model: the token budget an out-of-memory error lowered it to (later encoders start there)."""

MAX_PADDING = 0.1
"""Share of padding a batch may reach once it holds a quarter of the budget; past it the batch is closed."""


def packing_available() -> bool:
    """Whether this torch build has variable-length attention (what packed batches run on CUDA)."""
    return packing._varlen_attn() is not None


PACKING_MODES = ("off", "on", "auto")
"""EMBEDCTL_PACKING: `off` (the default until `python -m bench.gpu --parts packing` has measured packed batches on a
GPU), `on`, or `auto` (on CUDA where this torch has variable-length attention; CPU batches stay padded, where
`bench.attention` measured the short-sequence kernels they use)."""


def packing_mode(device: torch.device) -> bool:
    """Whether an encoder on `device` runs packed batches (EMBEDCTL_PACKING, every process reads it)."""
    mode = os.environ.get("EMBEDCTL_PACKING", "off").strip().lower() or "off"
    if mode not in PACKING_MODES:
        raise ConfigError(f"EMBEDCTL_PACKING must be one of {', '.join(PACKING_MODES)}, got {mode!r}")
    if mode == "auto":
        return device.type == "cuda" and packing_available()
    return mode == "on"


COMPILE_AFTER_SECONDS = 175.0
"""Eager forward seconds after which `--compile auto` compiles: the compile time measured for the 4B shape on an
H100 (174.6 s, bench-results/gpu-compile.json). Compiling then is the ski-rental rule: whatever the work left, the
process spends at most twice the time the better choice in hindsight would have (compiled it ran 1.54-1.68x eager's
speed, so a job of more than ~500 s of eager work gains from compiling at all)."""

COMPILE_BACKEND = "inductor"
"""The torch.compile backend (tests count graphs with a backend of their own)."""


def compile_after_seconds() -> float:
    """EMBEDCTL_COMPILE_AFTER (seconds of eager forward time before `--compile auto` compiles)."""
    raw = os.environ.get("EMBEDCTL_COMPILE_AFTER", "").strip()
    if not raw:
        return COMPILE_AFTER_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigError(f"EMBEDCTL_COMPILE_AFTER must be a number of seconds >= 0, got {raw!r}")
    return value


def compile_due(mode: str, device: torch.device, eager_seconds: float, after: float) -> bool:
    """Whether an encoder compiles now: `on` always; `auto` on CUDA once `after` seconds of eager forward time
    have passed in this process (on CPU compiling was measured no faster); `off` never."""
    if mode == "on":
        return True
    return mode == "auto" and device.type == "cuda" and eager_seconds >= after


def pack_batches(lengths: Sequence[int], budget: int, max_padding: float = MAX_PADDING) -> list[tuple[int, int]]:
    """Split texts sorted by descending length into [start, stop) batches whose padded size fits `budget`.

    A batch's padded size is its longest text times its count; a text longer than the budget runs alone. A batch
    is also closed early when the next text would raise its padding above `max_padding`, once it holds a quarter
    of the budget: a GPU budget spans a wide range of lengths (16k tokens are a thousand short texts), and without
    this cap a third of such a batch was padding (measured by `python -m bench.gpu`).
    """
    batches: list[tuple[int, int]] = []
    start = 0
    n = len(lengths)
    while start < n:
        longest = max(int(lengths[start]), 1)
        limit = min(n, start + max(1, budget // longest))
        stop, real = start + 1, int(lengths[start])
        while stop < limit:
            padded = (stop - start + 1) * longest
            real_next = real + int(lengths[stop])
            if padded - real_next > max_padding * padded and (stop - start) * longest * 4 >= budget:
                break
            real, stop = real_next, stop + 1
        batches.append((start, stop))
        start = stop
    return batches


@dataclass
class Prepared:
    """Texts ready for the model (`Encoder.prepare`): de-duplicated, tokenised, sorted by length."""

    inverse: np.ndarray  # (n,) index of each input text among the unique ones
    ids: list[list[int]]  # token ids of each unique text
    truncated: np.ndarray  # (unique,) bool
    lengths: np.ndarray  # (unique,) token counts
    order: np.ndarray  # unique texts by descending length

    @property
    def unique(self) -> int:
        return len(self.ids)


@dataclass
class Encoded:
    """Result of `Encoder.encode`: vectors in input order and what happened on the way."""

    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    truncated: np.ndarray  # (n,) bool: the text was cut at max_length
    tokens: int  # real (unpadded) tokens run through the model
    unique: int  # distinct texts embedded


class Encoder:
    """A loaded model with its tokenizer, ready to embed texts."""

    def __init__(self, model: torch.nn.Module, tokenizer, profile: ModelProfile, device: torch.device,
                 max_length: int | None = None, batch_tokens: int | None = None, compile: bool | str = "off",
                 packed: bool | None = None):
        self.model = model
        use_embedctl_attention(model)  # plain attention for short CPU sequences (pipeline/attention.py)
        self.compile_mode = compile_mode(compile)
        # Packed batches (no padding, attention per sequence): see `packing_mode`.
        self.packed = packing_mode(device) if packed is None else packed
        self._module = model
        self.device = device
        if isinstance(model, torch.nn.Module) and _EAGER_SECONDS not in model.__dict__:
            object.__setattr__(model, _EAGER_SECONDS, 0.0)  # set now: a run adds no attribute to a shared model
        self._compile_if_due()
        if self._module is model:
            use_onednn_linear(model)  # fused bias and GELU for fp32 on CPU (pipeline/kernels.py)
        self.tokenizer = tokenizer
        self.profile = profile
        self.max_length = int(max_length or profile.max_length)
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length!r}")
        self.batch_tokens = int(batch_tokens or default_batch_tokens(device))
        if self.batch_tokens <= 0:
            raise ConfigError(f"batch_tokens must be > 0, got {self.batch_tokens!r}")
        fits = getattr(model, _BUDGET_THAT_FITS, None)
        if fits is not None and fits < self.batch_tokens:  # an earlier encoder of this model ran out of memory
            LOG.warning("--batch-tokens %d -> %d: the budget an earlier out-of-memory error left for this model",
                        self.batch_tokens, fits)
            self.batch_tokens = fits
        self.left_padding = profile.pooling == "last"
        self.eos_id = _eos_to_append(tokenizer) if profile.pooling == "last" else None
        self.pad_id = _pad_id(tokenizer)
        self.source = "memory"  # where the weights came from: disk, shm:<segment>, or a model handed in
        self.forward_seconds = 0.0  # time in the model's forward passes (device time on CUDA; for the benchmarks)
        self.padded_tokens = 0  # tokens run through the model, padding included
        # A fast tokenizer called with truncation changes its own settings: two threads at once would clash
        # ("Already borrowed"), and `prepare` may run in a reader thread beside the model's thread.
        self._tokenizer_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.profile.dim

    @property
    def is_compiled(self) -> bool:
        return self._module is not self.model

    def _compile_if_due(self) -> None:
        """Switch to the compiled model when `compile_due` says so (checked at creation and before each run)."""
        if self.is_compiled or self.compile_mode == "off":
            return
        eager = getattr(self.model, _EAGER_SECONDS, 0.0)
        if compile_due(self.compile_mode, self.device, eager, compile_after_seconds()):
            if self.compile_mode == "auto":
                LOG.info("compiling the model after %.0f s of eager forward passes (--compile auto; "
                         "EMBEDCTL_COMPILE_AFTER)", eager)
            use_pytorch_linear(self.model)  # inductor does its own fusion, from the model's own layers
            self._module = compiled(self.model, static=self.packed)

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids of each text (special tokens included), cut at max_length; and which texts were cut."""
        with self._tokenizer_lock:
            return self._tokenize(texts)

    def _tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        limit = self.max_length - (1 if self.eos_id is not None else 0)
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        truncated = np.fromiter((len(x) > limit for x in ids), dtype=bool, count=len(ids))
        if truncated.any():
            where = np.flatnonzero(truncated)
            # Re-tokenise with truncation so that special tokens (e.g. [SEP]) are kept at the end.
            cut = self.tokenizer([texts[i] for i in where], add_special_tokens=True, truncation=True,
                                 max_length=limit, verbose=False)["input_ids"]
            for i, seq in zip(where, cut, strict=True):
                ids[i] = seq
        if self.eos_id is not None:
            for seq in ids:
                seq.append(self.eos_id)
        return ids, truncated

    def encode(self, texts: Sequence[str], prefix: str = "",
               on_progress: Callable[[int], None] | None = None) -> Encoded:
        """Embed `texts` (each preceded by `prefix`); identical texts are embedded once.

        Args:
            texts: the texts, in corpus order.
            prefix: instruction prefix (see `ModelProfile.query_prefix` / `document_prefix`).
            on_progress: called with the number of distinct texts finished after each batch.
        """
        return self.run(self.prepare(texts, prefix), on_progress)

    def prepare(self, texts: Sequence[str], prefix: str = "") -> Prepared:
        """The host side of `encode` (de-duplicate, tokenise, sort): safe to run in another thread meanwhile."""
        first_seen: dict[str, int] = {}
        inverse = np.fromiter((first_seen.setdefault(t, len(first_seen)) for t in texts), dtype=np.int64,
                              count=len(texts))
        unique = list(first_seen)
        ids, truncated = [], np.zeros(0, bool)
        if unique:
            ids, truncated = self.tokenize([prefix + t for t in unique] if prefix else unique)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        return Prepared(inverse=inverse, ids=ids, truncated=truncated, lengths=lengths,
                        order=np.argsort(-lengths, kind="stable"))

    def run(self, prepared: Prepared, on_progress: Callable[[int], None] | None = None) -> Encoded:
        """The model side of `encode`: run the prepared texts in token-budget batches; vectors in input order."""
        p = prepared
        self._compile_if_due()
        if not p.unique:
            return Encoded(np.zeros((len(p.inverse), self.dim), np.float32), np.zeros(len(p.inverse), bool), 0, 0)
        # Pooled vectors stay on the device until every batch is queued: on CUDA the host prepares batch k+1
        # while the GPU runs batch k, and the one copy back at the end is the only wait.
        pooled, timer = [], _ForwardTimer(self.device)
        lengths = p.lengths[p.order]
        batch = self._batches
        batches, i = batch(lengths, self.batch_tokens), 0
        with torch.inference_mode():
            while i < len(batches):
                start, stop = batches[i]
                self._check_weights()
                try:
                    pooled.append(self._forward([p.ids[k] for k in p.order[start:stop]], timer))
                except torch.OutOfMemoryError:
                    self._halve_budget(int(lengths[start]), stop - start)
                    batches[i:] = [(start + a, start + b) for a, b in batch(lengths[start:], self.batch_tokens)]
                    continue
                if on_progress is not None:
                    on_progress(stop - start)
                i += 1
            out = np.empty((p.unique, self.dim), dtype=np.float32)
            out[p.order] = torch.cat(pooled).cpu().numpy()
        self._check_weights()  # an exporter gone during the last batches may have left garbage in them
        seconds = timer.seconds()
        self.forward_seconds += seconds
        if not self.is_compiled:
            object.__setattr__(self.model, _EAGER_SECONDS, getattr(self.model, _EAGER_SECONDS, 0.0) + seconds)
        return Encoded(vectors=out[p.inverse], truncated=p.truncated[p.inverse], tokens=int(p.lengths.sum()),
                       unique=p.unique)

    def _check_weights(self) -> None:
        """Raise WeightsLost when the exporter of the device weights this model maps has exited."""
        lease = getattr(self.model, "_embedctl_lease", None)
        if lease is None:
            return
        from embedctl.shm_loader.share import ExporterLost

        try:
            lease.check()
        except ExporterLost as exc:
            raise WeightsLost(str(exc)) from None

    def _halve_budget(self, longest: int, count: int) -> None:
        """After an out-of-memory error: halve the token budget for this and later batches (the work done is kept)."""
        if count == 1:
            raise ModelError(f"one text of {longest} tokens does not fit in the memory of {self.device}; lower "
                             f"--max-length (now {self.max_length}) or free memory on the device") from None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        old, self.batch_tokens = self.batch_tokens, max(1, min(self.batch_tokens, longest * count) // 2)
        # Kept on the model, which a worker process caches across tasks: its later encoders start from it.
        object.__setattr__(self.model, _BUDGET_THAT_FITS, self.batch_tokens)
        LOG.warning("out of memory on %s with a batch of %d x %d tokens: --batch-tokens %d -> %d for the rest of "
                    "this process's work with this model", self.device, count, longest, old, self.batch_tokens)

    def _batches(self, lengths: np.ndarray, budget: int) -> list[tuple[int, int]]:
        """Batches of the sorted lengths: padded ones within the budget, or packed ones of up to budget tokens."""
        if self.packed:
            return packing.pack_by_tokens(lengths, budget)
        return pack_batches(lengths, budget)

    def _forward(self, seqs: list[list[int]], timer: _ForwardTimer) -> torch.Tensor:
        """Pooled, L2-normalised float32 vectors of one batch (left on the device)."""
        if self.packed:
            # compiled: every batch exactly the budget's tokens (one static shape; see pipeline/packing.py)
            packed = packing.pack(seqs, self.device, total=self.batch_tokens if self.is_compiled else None,
                          pad_id=self.pad_id)
            self.padded_tokens += int(packed.input_ids.shape[1])
            with timer:
                return packing.packed_forward(self.model, packed, self.profile.pooling, self._module)
        packing.use_padded_attention(self.model)  # after packed batches on this model (else nothing to do)
        width = max(len(s) for s in seqs)
        input_ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for row, seq in enumerate(seqs):
            if self.left_padding:
                input_ids[row, width - len(seq):] = seq
                mask[row, width - len(seq):] = 1
            else:
                input_ids[row, :len(seq)] = seq
                mask[row, :len(seq)] = 1
        non_blocking = self.device.type == "cuda"
        input_ids_t = torch.from_numpy(input_ids).to(self.device, non_blocking=non_blocking)
        mask_t = torch.from_numpy(mask).to(self.device, non_blocking=non_blocking)
        self.padded_tokens += input_ids.size
        with timer:
            hidden = self._module(input_ids=input_ids_t, attention_mask=mask_t).last_hidden_state
            if self.profile.pooling == "mean":
                weights = mask_t.unsqueeze(-1).to(torch.float32)
                pooled = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            elif self.profile.pooling == "cls":
                pooled = hidden[:, 0].float()
            else:  # last token: with left padding it is the last position of every row
                pooled = hidden[:, -1].float()
            return torch.nn.functional.normalize(pooled, p=2, dim=1)


class _ForwardTimer:
    """Time spent in forward passes: wall time on CPU, CUDA events (device time, no sync per batch) on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.total = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __enter__(self) -> None:
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.total += time.perf_counter() - self.t0

    def seconds(self) -> float:
        """Total seconds (waits for the device's queued work on CUDA)."""
        if self.cuda and self.events:
            self.events[-1][1].synchronize()
            return self.total + sum(a.elapsed_time(b) for a, b in self.events) / 1000
        return self.total


def compiled(model: torch.nn.Module, static: bool = False) -> torch.nn.Module:
    """`torch.compile(model)`, made once per model and kept on it (a worker builds an Encoder per task).

    Compiling fuses the elementwise work between the matmuls (norms, rotary embeddings, activations). Padded
    batches vary in both dimensions with every batch, hence `dynamic=True`; packed batches (`static`) are padded to
    the token budget, so only the sequence count varies (marked dynamic by `packed_forward`) and the matmuls see one
    static shape. The first batches pay the compilation (minutes for a 4B model): worth it on GPUs for long runs
    (`python -m bench.gpu`), not on CPU, where it was measured no faster.
    """
    key = "_embedctl_compiled_static" if static else "_embedctl_compiled"
    module = model.__dict__.get(key)
    if module is None:
        module = torch.compile(model, dynamic=None if static else True, backend=COMPILE_BACKEND)
        object.__setattr__(model, key, module)  # not a registered submodule
    return module


def _eos_to_append(tokenizer) -> int | None:
    """The end-of-text id to append for last-token pooling, or None when the tokenizer appends one itself."""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if probe and probe[-1] in set(tokenizer.all_special_ids):
        return None
    vocab = tokenizer.get_vocab()
    eod = vocab.get("<|endoftext|>", tokenizer.eos_token_id)
    if eod is None:
        raise ModelError("last-token pooling needs an end-of-text token, and the tokenizer defines none")
    return int(eod)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # pragma: no cover


def import_model_code(path: Path) -> None:
    """Import the transformers code of the model in `path` without reading weights.

    A prefork worker parent calls this once before forking, so that its pool children only attach the weights
    and load the tokenizer (transformers imports a model's code lazily, which costs seconds).
    """
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401 - imported for its side effect
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(str(path))
    MODEL_MAPPING[type(config)]


def load_tokenizer(path: Path):
    """The model's tokenizer (fast, from its folder)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise ModelError(f"cannot load the tokenizer of {path}: {type(exc).__name__}: {exc}") from None


def load_transformer(path: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Load the transformer weights from disk (the path taken when no shared-memory segment exists)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # embedctl shows its own progress; a per-load bar would break it up
    try:
        model = AutoModel.from_pretrained(str(path), dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise ModelError(f"cannot load the model in {path}: {type(exc).__name__}: {exc}") from None
    return model.to(device).eval()


SHM_MODES = ("auto", "require", "off")
"""`auto`: attach to a published shared-memory segment when there is one, else load from disk;
`require`: fail without a segment (EMBEDCTL_REQUIRE_SHM=1); `off`: always load from disk."""


SHARE_WAIT_SECONDS = 120.0
"""How long a process waits for its device's weight exporter (one being restarted copies the weights again)."""


def load_model(folder: Path, dtype: torch.dtype, device: torch.device, shm: str = "auto",
               shm_dir: Path | None = None) -> tuple[torch.nn.Module, str]:
    """The transformer of `folder` in `dtype` on `device`, attached from shared memory when published.

    Returns the model and where its weights came from (`shm:<segment>`, `exporter:<segment>` or `disk`). In a
    worker of a bootstrap that shares device copies (EMBEDCTL_DEVICE_SHARE=on and its key; see
    shm_loader/share.py), the model maps the copy its device's exporter holds, waiting for an exporter being
    restarted and never falling back to the disk; otherwise the shared host copy is copied to the device: no disk
    read, no deserialisation.
    """
    if shm not in SHM_MODES:
        raise ConfigError(f"shm must be one of {', '.join(SHM_MODES)}, got {shm!r}")
    if shm != "off":
        from embedctl.shm_loader.errors import SegmentError
        from embedctl.shm_loader.model import attach_model, attach_shared_model
        from embedctl.shm_loader.share import ExporterLost, exporter_key

        try:
            key = exporter_key()
            if key is not None:
                model = attach_shared_model(folder, dtype, str(device), key, wait=SHARE_WAIT_SECONDS)
                return model, f"exporter:{model._embedctl_lease.segment}"
        except ExporterLost as exc:
            raise WeightsLost(str(exc)) from None  # the exporter is being restarted: retry the work later
        except SegmentError as exc:
            raise ModelError(str(exc)) from None

        try:
            model = attach_model(folder, dtype, shm_dir)
        except SegmentError as exc:
            raise ModelError(str(exc)) from None
        if model is not None:
            return model.to(device), f"shm:{model._embedctl_segment.name}"
        if shm == "require":
            from embedctl.shm_loader.segment import segment_name

            raise ModelError(f"no shared-memory segment {segment_name(folder, dtype)} for {folder} in "
                             f"{dtype_name(dtype)}, and shared weights are required; publish one with "
                             f"`embedctl shm publish --model {folder} --dtype {dtype_name(dtype)}`")
        LOG.info("no shared-memory segment for %s in %s: loading from disk", folder, dtype_name(dtype))
    return load_transformer(folder, dtype, device), "disk"


def load_encoder(ref: ModelRef, device: str = "auto", dtype: str = "auto", max_length: int | None = None,
                 batch_tokens: int | None = None, shm: str = "auto", shm_dir: Path | None = None,
                 compile: bool | str = "off", packed: bool | None = None) -> Encoder:
    """Load the model `ref` for embedding on `device` in `dtype` (attached from shared memory when published).
    `packed`: packed batches (default: EMBEDCTL_PACKING, see `packing_mode`)."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    profile = read_profile(ref.path)
    tokenizer = load_tokenizer(profile.transformer_path)
    model, source = load_model(profile.transformer_path, torch_dtype, dev, shm=shm, shm_dir=shm_dir)
    LOG.info("loaded %s (%s, %s pooling, dim %d) on %s in %s from %s", ref.name, profile.model_type,
             profile.pooling, profile.dim, dev, dtype_name(torch_dtype), source)
    encoder = Encoder(model, tokenizer, profile, dev, max_length=max_length, batch_tokens=batch_tokens,
                      compile=compile, packed=packed)
    encoder.source = source
    return encoder
