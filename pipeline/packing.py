"""Packed batches: the sequences of a batch concatenated into one row, with no padding.

A packed batch is one row of `sum(lengths)` tokens, the position ids restarting at 0 for every sequence and the
cumulative offsets `cu_seqlens` (0, l0, l0+l1, ...) marking where each sequence starts. Attention runs per
sequence, never across: on CUDA through PyTorch's variable-length attention
(`torch.nn.attention.varlen.varlen_attn`), elsewhere sequence by sequence (the CPU form is the test oracle of the
packed path; CPU batches stay padded, where `bench.attention` measured the short-sequence kernels). Pooling reads
each sequence's last token (`cu_seqlens[1:] - 1`), first token, or mean from the offsets.

The two batch planners stand side by side: `pack_by_tokens` (packed batches: a budget of real tokens) and
`pack_batches` (padded batches: a budget of padded tokens, with a cap on padding).

The attention function is registered with transformers' `AttentionInterface` under `PACKED_ATTENTION`, with a mask
builder that builds no mask: the offsets travel to every attention call as the keyword arguments transformers
already passes through its models for padding-free batches (`cu_seq_lens_q`, `cu_seq_lens_k`, `max_length_q`,
`max_length_k`).

Static shapes for `torch.compile`: a compiled encoder packs every batch to exactly its token budget (a filler
sequence of padding tokens closes the row; it attends only to itself and is never pooled) and rounds the longest
length up to a power of two, so the compiled graph sees one token count for the whole job, the number of sequences
is marked dynamic, and the few length buckets are absorbed by one automatic-dynamic recompile (`bench.gpu --parts
compile` counts them).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LOG = logging.getLogger(__name__)

PACKED_ATTENTION = "embedctl_packed"
"""Name of the packed attention implementation registered with transformers."""


@dataclass
class Packed:
    """One packed batch (tensors on the target device)."""

    input_ids: torch.Tensor  # (1, total) token ids of every sequence, one after the other
    position_ids: torch.Tensor  # (1, total) 0..len-1 for each sequence
    cu_seqlens: torch.Tensor  # (n + 1,) int32 offsets of the sequences
    max_length: int  # the longest sequence (rounded up to a power of two in static packing)
    count: int = -1  # real sequences (the filler of a static batch is not one); -1: all of cu_seqlens

    def __post_init__(self) -> None:
        if self.count < 0:
            self.count = len(self.cu_seqlens) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:self.count + 1] - self.cu_seqlens[:self.count]

    @property
    def real_cu_seqlens(self) -> torch.Tensor:
        """The offsets of the real sequences (what pooling reads)."""
        return self.cu_seqlens[:self.count + 1]

    def model_kwargs(self) -> dict:
        """What the model's forward takes for a packed batch (passed through to every attention call)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "cu_seq_lens_q": self.cu_seqlens,
                "cu_seq_lens_k": self.cu_seqlens, "max_length_q": self.max_length, "max_length_k": self.max_length,
                "use_cache": False}


def bucket_length(n: int) -> int:
    """The power of two at or above `n`: the longest-length argument of a static packed batch."""
    return 1 << max(0, int(n) - 1).bit_length()


def pack(sequences: list[list[int]], device: torch.device | str = "cpu", total: int | None = None,
         pad_id: int = 0) -> Packed:
    """Concatenate token sequences (each at least one token) into one packed row; with `total`, pad the row to
    exactly `total` tokens with one filler sequence (static shapes for `torch.compile`)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pack() needs sequences of at least one token")
    count = len(sequences)
    real = sum(len(s) for s in sequences)
    if total is not None and total > real:
        sequences = [*sequences, [pad_id] * (total - real)]
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int32)
    cu = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu[1:])
    total = int(cu[-1])
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long).unsqueeze(0)
    starts = torch.repeat_interleave(cu[:-1].long(), lengths.long())
    positions = (torch.arange(total, dtype=torch.long) - starts).unsqueeze(0)
    non_blocking = torch.device(device).type == "cuda"
    longest = int(lengths.max())
    return Packed(ids.to(device, non_blocking=non_blocking), positions.to(device, non_blocking=non_blocking),
                  cu.to(device, non_blocking=non_blocking), bucket_length(longest) if total else longest, count)


def pack_by_tokens(lengths: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """(start, stop) groups of consecutive sequences (sorted by length, longest first) whose tokens sum to at most
    `budget` (a longer sequence alone): a packed batch holds no padding, so the budget counts real tokens."""
    batches, start, total = [], 0, 0
    for i, n in enumerate(int(x) for x in lengths):
        if i > start and total + n > budget:
            batches.append((start, i))
            start, total = i, 0
        total += n
    if len(lengths):
        batches.append((start, len(lengths)))
    return batches


MAX_PADDING = 0.1
"""Share of padding a batch may reach once it holds a quarter of the budget; past it the batch is closed."""


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


def pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pooling: str) -> torch.Tensor:
    """(n, hidden) pooled vectors of a packed batch's hidden states (total, hidden) or (1, total, hidden):
    the last token of each sequence (`last`), its first (`cls`) or the mean of its tokens (`mean`)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    cu = cu_seqlens.long()
    if pooling == "last":
        return hidden[cu[1:] - 1].float()
    if pooling == "cls":
        return hidden[cu[:-1]].float()
    if pooling == "mean":
        sums = torch.zeros(len(cu), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        sums[1:] = torch.cumsum(hidden.float(), dim=0)[cu[1:] - 1]
        lengths = (cu[1:] - cu[:-1]).unsqueeze(1).float()
        return (sums[1:] - sums[:-1]) / lengths
    raise ValueError(f"pooling must be last, cls or mean, got {pooling!r}")


def _varlen_attn():
    """PyTorch's variable-length attention, or None where this build has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@torch.compiler.disable  # a Python loop over the sequences: run eagerly between the compiled layers
def per_sequence_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                           scaling: float, causal: bool) -> torch.Tensor:
    """Attention of each sequence with itself over packed (1, heads, total, dim) tensors; returns (1, total,
    heads, dim). Grouped key/value heads are expanded by SDPA's `enable_gqa`, without copies."""
    outputs = []
    bounds = cu_seqlens.tolist()
    gqa = query.shape[1] != key.shape[1]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        q, k, v = (t[:, :, start:stop] for t in (query, key, value))
        outputs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scaling,
                                                                        enable_gqa=gqa))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function for packed batches (1, heads, total, dim): per sequence, never across."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise RuntimeError(f"{PACKED_ATTENTION} attention needs cu_seq_lens_q: run the model on a packed batch")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    varlen = _varlen_attn() if query.device.type == "cuda" else None
    if varlen is None:
        return per_sequence_attention(query, key, value, cu, scale, causal), None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # varlen_attn takes (total, heads, dim)
    max_len = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
    out = varlen(q, *_varlen_kv(varlen, k, v, q.shape[1]), cu, cu, max_len, max_len, scale=scale,
                 **_varlen_options(varlen, causal, k.shape[1] != q.shape[1]))
    return out.unsqueeze(0), None


@functools.cache
def _parameters(function) -> frozenset[str]:
    """The parameter names of a function (read once: the attention runs in every layer of every batch)."""
    return frozenset(inspect.signature(function).parameters)


def _varlen_kv(varlen, key: torch.Tensor, value: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value for varlen_attn: grouped heads as they are where it takes `enable_gqa`, else expanded."""
    if key.shape[1] == heads or "enable_gqa" in _parameters(varlen):
        return key, value
    groups = heads // key.shape[1]
    return key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)


def _varlen_options(varlen, causal: bool, gqa: bool) -> dict:
    """The causal and grouped-query switches in the spelling of this torch build (`window_size=(-1, 0)` in the
    newer builds, `is_causal` in the first ones)."""
    params = _parameters(varlen)
    options = {"enable_gqa": True} if gqa and "enable_gqa" in params else {}
    if "window_size" in params:
        options["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        options["is_causal"] = causal
    return options


def _no_mask(*args, **kwargs) -> None:
    """The mask builder of packed attention: none (the offsets say where each sequence ends)."""
    return None


def register() -> str:
    """Register packed attention (and its mask builder) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if PACKED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, _no_mask)
    return PACKED_ATTENTION


_UNPACKED = "_embedctl_unpacked_attention"
"""Attribute of a model: the attention implementation it had before packed batches switched it."""


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch the model's attention to packed attention, once: it stays until `use_padded_attention`."""
    current = model.config._attn_implementation
    if current != PACKED_ATTENTION:
        object.__setattr__(model, _UNPACKED, current)
        model.set_attn_implementation(register())


def use_padded_attention(model: torch.nn.Module) -> None:
    """Give back the attention a model had before packed batches (for a padded batch on the same model)."""
    previous = model.__dict__.get(_UNPACKED)
    if previous is not None and model.config._attn_implementation == PACKED_ATTENTION:
        model.set_attn_implementation(previous)


def packed_forward(model: torch.nn.Module, packed: Packed, pooling: str,
                   module: torch.nn.Module | None = None) -> torch.Tensor:
    """Pooled, L2-normalised float32 vectors of a packed batch (the model's attention switched to packed attention
    if it is not yet). `module`: what runs the forward (the compiled model)."""
    module = module if module is not None else model
    if module is not model:
        torch._dynamo.mark_dynamic(packed.cu_seqlens, 0)  # the sequence count varies; the token count does not
    use_packed_attention(model)
    hidden = module(**packed.model_kwargs()).last_hidden_state
    return torch.nn.functional.normalize(pool_packed(hidden, packed.real_cu_seqlens, pooling), p=2, dim=1)
