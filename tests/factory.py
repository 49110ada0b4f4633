"""Builders of small real models for tests and benchmarks (saved like real checkpoints, loaded by product code).

The tiny Qwen3 model has random weights and a byte-level BPE tokenizer trained in-process with `tokenizers`:
no download, same architecture and code path as Qwen3-Embedding.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("dog cat house tree river stone light dark water fire small large quick slow animal plant city "
         "music paper metal glass cloud rain snow wind road bridge ship train horse bird fish green blue "
         "red yellow old new happy sad run walk eat drink read write build break open close the a of and "
         "to in is that which for with as on by an or be this from at it are not").split()


def training_texts(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(n)]


def build_tokenizer(append_eos: bool = False, texts: list[str] | None = None, vocab_size: int = 600,
                    model_max_length: int = 512):
    """A byte-level BPE tokenizer with the Qwen special tokens, trained on `texts` (default: a small word list);
    optionally appending <|endoftext|> itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or training_texts(), trainer=trainer)
    if append_eos:
        eod = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>", special_tokens=[("<|endoftext|>", eod)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=model_max_length)


def save_tiny_qwen3(path: Path, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate_size: int = 128, dtype: str = "bfloat16", append_eos: bool = False,
                    seed: int = 0, vocab_size: int | None = None, head_dim: int | None = None,
                    tokenizer=None, device: str = "cpu", sentence_transformers: bool = False) -> Path:
    """Save a random Qwen3 embedding model (Qwen3Model weights + tokenizer) to `path`, like a real checkpoint.

    `device`: where the random weights are made (a GPU makes billions in seconds). `sentence_transformers`: also
    write the sentence-transformers files of Qwen3-Embedding (last-token pooling, normalise).
    """
    import torch
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = tokenizer or build_tokenizer(append_eos=append_eos)
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=max(vocab_size or 0, len(tokenizer)), hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim or hidden_size // heads,
                         max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device(device):
        model = Qwen3Model(config).to(getattr(torch, dtype))
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if sentence_transformers:
        write_sentence_transformers_config(path, hidden_size, tokenizer.model_max_length)
    return path


def write_sentence_transformers_config(path: Path, dim: int, max_seq_length: int) -> None:
    """The sentence-transformers files of Qwen3-Embedding: Transformer, last-token Pooling, Normalize."""
    write_json(path / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}])
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "2_Normalize").mkdir(exist_ok=True)
    write_json(path / "1_Pooling" / "config.json", {"word_embedding_dimension": dim, "pooling_mode_lasttoken": True,
                                                     "include_prompt": True})
    write_json(path / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2))
