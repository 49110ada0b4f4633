"""Embedding correctness against references (cosine >= 0.9999 on the same inputs) and encoder behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedctl.pipeline.encoder import Encoder, load_encoder
from embedctl.pipeline.loader import LoadedModel
from embedctl.pipeline.models import ModelRef, format_instruction, read_profile
from embedctl.pipeline.packing import pack_batches

TEXTS = [
    "a domesticated carnivorous mammal that barks",
    "the act of running quickly",
    "river",
    "a large body of salt water that covers most of the earth, home to whales and fish and ships",
    "the act of running quickly",  # a duplicate: embedded once, returned twice
    "Ünïcödé text with émojis 🙂 and CJK 漢字",
    "short",
    " ".join(["word"] * 120),
]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def test_minilm_matches_sentence_transformers(minilm_path):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_path), device="cpu").encode(TEXTS, normalize_embeddings=True)
    ours = load_encoder(ModelRef("minilm", minilm_path), device="cpu", batch_tokens=64).encode(TEXTS).vectors
    assert ours.shape == (len(TEXTS), 384)
    assert _cos(ours, reference).min() >= 0.9999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def _model_card_reference(path, texts: list[str], task: str | None) -> np.ndarray:
    """Qwen3-Embedding model card: left padding, <|endoftext|> appended, last token, L2 normalise (fp32)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side="left")
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    inputs = [f"Instruct: {task}\nQuery:{t}" for t in texts] if task else list(texts)
    eod_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batch = tokenizer(inputs, padding=False, truncation=True, max_length=8192 - 2)
    for seq, att in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        if seq[-1] != eod_id:  # the updated tokenizers append it themselves
            seq.append(eod_id)
            att.append(1)
    batch = tokenizer.pad(batch, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    left_padding = bool(batch["attention_mask"][:, -1].sum() == batch["attention_mask"].shape[0])
    assert left_padding
    pooled = hidden[:, -1]
    return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


@pytest.mark.parametrize("task", [None, "Given a web search query, retrieve relevant passages"])
@pytest.mark.parametrize("fixture", ["tiny_qwen3", "tiny_qwen3_eos"])
def test_tiny_qwen3_bf16_matches_model_card(request, fixture, task):
    path = request.getfixturevalue(fixture)
    texts = ["dog cat house", "river stone light dark water", "the quick horse", "a", "dog cat house"]
    reference = _model_card_reference(path, texts, task)
    encoder = load_encoder(ModelRef("tiny", path), device="cpu", batch_tokens=16)
    assert next(encoder.model.parameters()).dtype == torch.float32  # bf16 checkpoint, fp32 compute on CPU
    prefix = format_instruction(task) if task else ""
    ours = encoder.encode(texts, prefix=prefix).vectors
    assert _cos(ours, reference).min() >= 0.9999


def test_eos_appended_only_when_tokenizer_does_not(tiny_qwen3, tiny_qwen3_eos):
    plain = load_encoder(ModelRef("a", tiny_qwen3), device="cpu")
    appending = load_encoder(ModelRef("b", tiny_qwen3_eos), device="cpu")
    eod = plain.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert plain.eos_id == eod
    assert appending.eos_id is None
    ids, _ = plain.tokenize(["dog cat"])
    ids2, _ = appending.tokenize(["dog cat"])
    assert ids[0][-1] == eod and ids2[0][-1] == eod
    assert ids[0] == ids2[0]


def test_results_do_not_depend_on_batching_or_order(tiny_qwen3):
    encoder = load_encoder(ModelRef("tiny", tiny_qwen3), device="cpu")
    texts = [" ".join(["dog"] * n) for n in (1, 30, 5, 17, 2, 60, 9)]
    singles = np.stack([encoder.encode([t]).vectors[0] for t in texts])
    encoder.batch_tokens = 40
    packed = encoder.encode(texts).vectors
    assert _cos(packed, singles).min() >= 0.9999


def test_duplicates_embedded_once_and_order_restored(tiny_qwen3):
    encoder = load_encoder(ModelRef("tiny", tiny_qwen3), device="cpu")
    calls = []
    original = encoder._forward
    encoder._forward = lambda seqs, timer: calls.append(len(seqs)) or original(seqs, timer)
    texts = ["dog", "cat house", "dog", "river", "cat house", "dog"]
    out = encoder.encode(texts)
    assert sum(calls) == 3 and out.unique == 3
    assert np.array_equal(out.vectors[0], out.vectors[2]) and np.array_equal(out.vectors[1], out.vectors[4])
    assert not np.allclose(out.vectors[0], out.vectors[1])


def test_truncation_is_counted_and_keeps_special_tokens(minilm_path):
    encoder = load_encoder(ModelRef("minilm", minilm_path), device="cpu", max_length=8)
    ids, truncated = encoder.tokenize(["one two", "one two three four five six seven eight nine ten"])
    assert truncated.tolist() == [False, True]
    assert len(ids[1]) == 8 and ids[1][-1] == encoder.tokenizer.sep_token_id
    out = encoder.encode(["one two", "one two three four five six seven eight nine ten"])
    assert out.truncated.tolist() == [False, True]


def test_pack_batches_respects_the_token_budget():
    lengths = [50, 40, 40, 10, 10, 10, 10, 3, 1]
    batches = pack_batches(lengths, 80)
    assert batches[0] == (0, 1)  # 50: a second text would make 100 padded tokens
    covered = [i for a, b in batches for i in range(a, b)]
    assert covered == list(range(len(lengths)))
    for a, b in batches:
        assert lengths[a] * (b - a) <= 80 or b - a == 1
    assert pack_batches([500, 20], 100)[0] == (0, 1)  # longer than the budget: alone
    assert pack_batches([], 100) == []


def test_encoder_rejects_bad_settings(tiny_qwen3):
    from embedctl.pipeline.errors import ConfigError

    profile = read_profile(tiny_qwen3)
    with pytest.raises(ConfigError, match="batch_tokens must be > 0"):
        Encoder(LoadedModel(None, _FakeTok(), profile, torch.device("cpu")), batch_tokens=-1)


class _FakeTok:
    all_special_ids = [0]
    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [5, 0]}

    def get_vocab(self):
        return {}


def _has_compiler() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("cc", "gcc", "g++", "c++"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_compiler(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_encoder_matches_eager_and_compiles_once_per_model(tiny_qwen3):
    eager = load_encoder(ModelRef("tiny", tiny_qwen3), device="cpu", shm="off")
    fast = Encoder(eager.loaded, compile=True)
    assert fast._module is eager.loaded.compiled() and fast._module is not eager.model
    assert _cos(fast.encode(TEXTS).vectors, eager.encode(TEXTS).vectors).min() >= 0.9999
    again = Encoder(eager.loaded, compile=True)
    assert again._module is fast._module  # a worker's next task reuses the compiled model
    assert all(m is not fast._module for m in eager.model.modules())  # not a registered submodule


def test_pack_batches_caps_padding_once_a_batch_is_a_quarter_full():
    lengths = [40] * 30 + [10] * 300  # a long head, then a tail of short texts
    batches = pack_batches(lengths, 4000)
    assert 30 <= batches[0][1] <= 34  # the 40s and a few 10s: more would pass 10% padding
    assert batches[0][1] < 100  # without the cap the first batch would take 4000 // 40 = 100 texts
    for a, b in batches:
        padded = lengths[a] * (b - a)
        assert padded <= 4000
        assert padded - sum(lengths[a:b]) <= 0.1 * padded
    small = pack_batches([40, 10, 10], 4000)
    assert small == [(0, 3)]  # under a quarter of the budget: padding is not worth a second batch


def test_out_of_memory_halves_the_budget_and_keeps_the_vectors(tiny_qwen3, caplog):
    from embedctl.pipeline.errors import ModelError

    encoder = load_encoder(ModelRef("tiny", tiny_qwen3), device="cpu", shm="off", batch_tokens=4096)
    expected = encoder.encode(TEXTS).vectors
    original = encoder._forward

    def small_memory(seqs, timer):
        if len(seqs) > 2:  # a device that holds two texts at once
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(seqs, timer)

    encoder._forward = small_memory
    with caplog.at_level("WARNING"):
        got = encoder.encode(TEXTS).vectors
    assert _cos(got, expected).min() >= 0.9999
    assert encoder.batch_tokens < 4096 and "out of memory" in caplog.text
    # A worker builds an encoder per task over its cached model: the next one starts from the lower budget.
    again = Encoder(encoder.loaded, batch_tokens=4096)
    assert again.batch_tokens == encoder.batch_tokens
    assert Encoder(encoder.loaded, batch_tokens=8).batch_tokens == 8
    encoder._forward = lambda seqs, timer: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
    with pytest.raises(ModelError, match="does not fit in the memory .* lower --max-length"):
        encoder.encode(["one text alone"])
