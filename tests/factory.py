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


def build_tokenizer(append_eos: bool = False):
    """A byte-level BPE tokenizer with the Qwen special tokens; optionally appending <|endoftext|> itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_texts(), trainer=trainer)
    if append_eos:
        eod = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>", special_tokens=[("<|endoftext|>", eod)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=512)


def save_tiny_qwen3(path: Path, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate_size: int = 128, dtype: str = "bfloat16", append_eos: bool = False,
                    seed: int = 0, vocab_size: int | None = None, head_dim: int | None = None) -> Path:
    """Save a random Qwen3 embedding model (Qwen3Model weights + tokenizer) to `path`, like a real checkpoint."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer(append_eos=append_eos)
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=max(vocab_size or 0, len(tokenizer)), hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=head_dim or hidden_size // heads,
                         max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = Qwen3Model(config).to(getattr(torch, dtype))
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2))
