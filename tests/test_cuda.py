"""The CUDA paths of the encoder, on a GPU host (skipped where torch sees no CUDA device).

What runs on CPU elsewhere runs here on the device: the same model folder, the model card's fp32 formula on CPU as
the reference, bf16 (the CUDA default) against it, shared-memory weights copied to the device, and the token
budget not changing the vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedctl.pipeline.encoder import load_encoder
from embedctl.pipeline.models import ModelRef
from tests.test_encoder import TEXTS, _cos, _model_card_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (run on a GPU host)")


@pytest.fixture(scope="module")
def reference(tiny_qwen3) -> np.ndarray:
    return _model_card_reference(tiny_qwen3, TEXTS, None)


def test_fp32_on_cuda_matches_the_model_card_reference(tiny_qwen3, reference):
    encoder = load_encoder(ModelRef("tiny", tiny_qwen3), device="cuda", dtype="fp32", shm="off")
    assert next(encoder.model.parameters()).device.type == "cuda"
    ours = encoder.encode(TEXTS)
    assert _cos(ours.vectors, reference).min() >= 0.9999
    assert encoder.forward_seconds > 0  # device time from CUDA events


def test_auto_dtype_on_cuda_is_bf16_and_close_to_fp32(tiny_qwen3, reference):
    encoder = load_encoder(ModelRef("tiny", tiny_qwen3), device="cuda", shm="off")
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    cos = _cos(encoder.encode(TEXTS).vectors, reference)
    print(f"bf16 on CUDA vs fp32 reference: min cos {cos.min():.5f}")
    assert cos.min() >= 0.99


def test_token_budget_does_not_change_vectors_on_cuda(tiny_qwen3):
    ref = ModelRef("tiny", tiny_qwen3)
    small = load_encoder(ref, device="cuda", dtype="fp32", shm="off", batch_tokens=32).encode(TEXTS).vectors
    large = load_encoder(ref, device="cuda", dtype="fp32", shm="off", batch_tokens=65536).encode(TEXTS).vectors
    assert _cos(small, large).min() >= 0.9999


def test_shared_memory_weights_are_copied_to_the_device(tiny_qwen3, tmp_path):
    from embedctl.shm_loader.segment import publish

    publish(tiny_qwen3, torch.bfloat16, shm_dir=tmp_path)
    ref = ModelRef("tiny", tiny_qwen3)
    attached = load_encoder(ref, device="cuda", shm="require", shm_dir=tmp_path)
    assert attached.source.startswith("shm:")
    assert all(p.device.type == "cuda" for p in attached.model.parameters())
    loaded = load_encoder(ref, device="cuda", shm="off")
    assert _cos(attached.encode(TEXTS).vectors, loaded.encode(TEXTS).vectors).min() >= 0.9999


def test_compiled_model_on_cuda_matches_eager(tiny_qwen3):
    from embedctl.pipeline.encoder import Encoder

    eager = load_encoder(ModelRef("tiny", tiny_qwen3), device="cuda", dtype="fp32", shm="off")
    fast = Encoder(eager.loaded, compile=True)
    assert _cos(fast.encode(TEXTS).vectors, eager.encode(TEXTS).vectors).min() >= 0.9999


def test_a_real_out_of_memory_halves_the_budget_and_keeps_the_vectors(tiny_qwen3):
    """The device's own OutOfMemoryError (memory capped for this process), not a simulated one."""
    from embedctl.pipeline.encoder import Encoder

    texts = [f"{TEXTS[i % len(TEXTS)]} " * 40 + str(i) for i in range(2000)]
    ref = ModelRef("tiny", tiny_qwen3)
    expected = load_encoder(ref, device="cuda", dtype="fp32", shm="off", batch_tokens=4096).encode(texts).vectors
    encoder = load_encoder(ref, device="cuda", dtype="fp32", shm="off", batch_tokens=1 << 22)  # all in one batch
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = torch.cuda.memory_reserved() + (64 << 20)  # the cap applies to what the caching allocator reserves
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        got = encoder.encode(texts).vectors
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert encoder.batch_tokens < 1 << 22  # it ran out of memory for real, and went on with a smaller budget
    assert _cos(got, expected).min() >= 0.9999
    assert Encoder(encoder.loaded, batch_tokens=1 << 22).batch_tokens == encoder.batch_tokens
