"""A cheap fingerprint of a model folder: file names, sizes and modification times."""

from __future__ import annotations

import hashlib
from pathlib import Path

MODEL_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
"""Files that define a model (weights, configs, tokenizer)."""


def folder_fingerprint(path: Path) -> str:
    """Changes when any weight, config or tokenizer file of the folder is replaced, resized or touched."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(MODEL_SUFFIXES)):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
