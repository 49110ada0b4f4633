"""The encoder: texts in, L2-normalised float32 vectors out, in input order.

Texts are de-duplicated, tokenised, sorted by token length and packed into batches by a token budget (padded
tokens per forward pass, like text-embeddings-inference's `--max-batch-tokens`), so short texts fill big
batches and long ones do not run out of memory. Pooling follows the model profile: mean over the attention
mask, the CLS token, or the last token (decoder-only models, left padding, an end-of-text token appended when
the tokenizer does not append one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedctl.pipeline import packing, policy
from embedctl.pipeline.attention import use_embedctl_attention
from embedctl.pipeline.defaults import compile_mode
from embedctl.pipeline.errors import ConfigError, ModelError
from embedctl.pipeline.kernels import use_onednn_linear, use_pytorch_linear
from embedctl.pipeline.loader import LoadedModel, default_batch_tokens, load
from embedctl.pipeline.models import ModelProfile, ModelRef

LOG = logging.getLogger(__name__)


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
    """A loaded model (`pipeline.loader.LoadedModel`) ready to embed texts: prepare (tokenise), run (batches
    through the model), pool. Encoders built over one loaded model share what it learnt (compiled module, eager
    time, the token budget that fits)."""

    def __init__(self, loaded: LoadedModel, max_length: int | None = None, batch_tokens: int | None = None,
                 compile: bool | str = "off", packed: bool | None = None):
        self.loaded = loaded
        model, device, profile = loaded.model, loaded.device, loaded.profile
        use_embedctl_attention(model)  # plain attention for short CPU sequences (pipeline/attention.py)
        self.compile_mode = compile_mode(compile)
        # Packed batches (no padding, attention per sequence): see `policy.packing_mode`.
        self.packed = policy.packing_mode(device) if packed is None else packed
        self._module = model
        self._compile_if_due()
        if self._module is model:
            use_onednn_linear(model)  # fused bias and GELU for fp32 on CPU (pipeline/kernels.py)
        self.max_length = int(max_length or profile.max_length)
        if self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {self.max_length!r}")
        self.batch_tokens = int(batch_tokens or default_batch_tokens(device))
        if self.batch_tokens <= 0:
            raise ConfigError(f"batch_tokens must be > 0, got {self.batch_tokens!r}")
        fits = loaded.budget_that_fits
        if fits is not None and fits < self.batch_tokens:  # an earlier encoder of this model ran out of memory
            LOG.warning("--batch-tokens %d -> %d: the budget an earlier out-of-memory error left for this model",
                        self.batch_tokens, fits)
            self.batch_tokens = fits
        self.left_padding = profile.pooling == "last"
        self.eos_id = _eos_to_append(self.tokenizer) if profile.pooling == "last" else None
        self.pad_id = _pad_id(self.tokenizer)
        self.forward_seconds = 0.0  # time in the model's forward passes (device time on CUDA; for the benchmarks)
        self.padded_tokens = 0  # tokens run through the model, padding included
        # A fast tokenizer called with truncation changes its own settings: two threads at once would clash
        # ("Already borrowed"), and `prepare` may run in a reader thread beside the model's thread.
        self._tokenizer_lock = threading.Lock()

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def profile(self) -> ModelProfile:
        return self.loaded.profile

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def source(self) -> str:
        """Where the weights came from: disk, shm:<segment>, exporter:<segment>, or memory (a model handed in)."""
        return self.loaded.source

    @property
    def dim(self) -> int:
        return self.profile.dim

    @property
    def token_limit(self) -> int:
        """Tokens a text keeps (special tokens included): max_length, less the end token appended for last-token
        pooling."""
        return self.max_length - (1 if self.eos_id is not None else 0)

    @property
    def is_compiled(self) -> bool:
        return self._module is not self.model

    def _compile_if_due(self) -> None:
        """Switch to the compiled model when `policy.compile_due` says so (checked at creation and before each
        run)."""
        if self.is_compiled or self.compile_mode == "off":
            return
        eager = self.loaded.eager_seconds
        if policy.compile_due(self.compile_mode, self.device, eager, policy.compile_after_seconds()):
            if self.compile_mode == "auto":
                LOG.info("compiling the model after %.0f s of eager forward passes (--compile auto; "
                         "EMBEDCTL_COMPILE_AFTER)", eager)
            use_pytorch_linear(self.model)  # inductor does its own fusion, from the model's own layers
            self._module = self.loaded.compiled(static=self.packed)

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids of each text (special tokens included), cut at max_length; and which texts were cut."""
        with self._tokenizer_lock:
            return self._tokenize(texts)

    def _tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        limit = self.token_limit
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
                self.loaded.check()
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
        self.loaded.check()  # an exporter gone during the last batches may have left garbage in them
        seconds = timer.seconds()
        self.forward_seconds += seconds
        if not self.is_compiled:
            self.loaded.eager_seconds += seconds
        return Encoded(vectors=out[p.inverse], truncated=p.truncated[p.inverse], tokens=int(p.lengths.sum()),
                       unique=p.unique)

    def _halve_budget(self, longest: int, count: int) -> None:
        """After an out-of-memory error: halve the token budget for this and later batches (the work done is kept)."""
        if count == 1:
            raise ModelError(f"one text of {longest} tokens does not fit in the memory of {self.device}; lower "
                             f"--max-length (now {self.max_length}) or free memory on the device") from None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        old, self.batch_tokens = self.batch_tokens, max(1, min(self.batch_tokens, longest * count) // 2)
        # Kept on the loaded model, which a worker process caches across tasks: its later encoders start from it.
        self.loaded.budget_that_fits = self.batch_tokens
        LOG.warning("out of memory on %s with a batch of %d x %d tokens: --batch-tokens %d -> %d for the rest of "
                    "this process's work with this model", self.device, count, longest, old, self.batch_tokens)

    def _batches(self, lengths: np.ndarray, budget: int) -> list[tuple[int, int]]:
        """Batches of the sorted lengths: padded ones within the budget, or packed ones of up to budget tokens."""
        if self.packed:
            return packing.pack_by_tokens(lengths, budget)
        return packing.pack_batches(lengths, budget)

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


def load_encoder(ref: ModelRef, device: str = "auto", dtype: str = "auto", max_length: int | None = None,
                 batch_tokens: int | None = None, shm: str = "auto", shm_dir: Path | None = None,
                 compile: bool | str = "off", packed: bool | None = None) -> Encoder:
    """Load the model `ref` (`pipeline.loader.load`) and make an encoder of it.
    `packed`: packed batches (default: EMBEDCTL_PACKING, see `policy.packing_mode`)."""
    return Encoder(load(ref, device, dtype, shm=shm, shm_dir=shm_dir), max_length=max_length,
                   batch_tokens=batch_tokens, compile=compile, packed=packed)
