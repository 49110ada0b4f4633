"""The ceiling figures of `python -m bench.throughput`: the GEMMs it replays are the model's own."""

from __future__ import annotations

import pytest

from bench.throughput import (
    gemm_rate,
    model_flops_per_token,
    recorded_gemms,
    replay_gemm_rate,
    time_by_operator,
)
from embedctl.pipeline.encoder import load_encoder
from embedctl.pipeline.models import ModelRef
from embedctl.pipeline.packing import pack_batches

TEXTS = ["a domestic animal that barks", "the act of running quickly", "x", "a unit of length " * 40] * 3


@pytest.fixture(scope="module")
def encoder(minilm_path):
    encoder = load_encoder(ModelRef("minilm", minilm_path), device="cpu", shm="off")
    encoder.batch_tokens = 64
    return encoder


def test_recorded_gemms_are_the_batches_and_layers_the_encoder_runs(encoder):
    before = dict(encoder.model.__dict__)
    batches = recorded_gemms(encoder, TEXTS)
    prepared = encoder.prepare(TEXTS)
    lengths = prepared.lengths[prepared.order]
    planned = [(stop - start) * int(lengths[start]) for start, stop in pack_batches(lengths, encoder.batch_tokens)]
    assert [tokens for tokens, _ in batches] == planned  # padded tokens of each batch, in order
    cfg = encoder.model.config
    for tokens, calls in batches:
        per_token = [(i, o) for rows, i, o in calls if rows == tokens]
        assert len(per_token) == 6 * cfg.num_hidden_layers  # q, k, v, output, intermediate, output per layer
        assert sorted(set(per_token)) == sorted({(cfg.hidden_size, cfg.hidden_size),
                                                 (cfg.hidden_size, cfg.intermediate_size),
                                                 (cfg.intermediate_size, cfg.hidden_size)})
        assert all(rows < tokens for rows, _, _ in calls if rows != tokens)  # the pooler: one row a text
    assert dict(encoder.model.__dict__).keys() == before.keys()  # the oneDNN switch and no hook left behind
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in encoder.model.modules())


def test_flops_per_token_count_only_the_layers_that_run_on_every_token(encoder):
    batches = recorded_gemms(encoder, TEXTS)
    every_linear = model_flops_per_token(encoder.model, 10.0)
    per_token = model_flops_per_token(encoder.model, 10.0, batches)
    pooler = encoder.model.pooler.dense.weight.numel()
    assert every_linear - per_token == pytest.approx(2 * pooler)


def test_replay_and_operator_shares_measure_something(encoder):
    batches = recorded_gemms(encoder, TEXTS)
    peak = gemm_rate(encoder.model.config.hidden_size, encoder.model.config.intermediate_size, repeats=3)
    assert 0.02 * peak < replay_gemm_rate(batches, every=1) < 20 * peak  # FLOPs counted as run, not off by a factor
    shares = time_by_operator(encoder, TEXTS)
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)
    named = {group: share for group, share in shares.items() if group != "other"}
    assert max(named, key=named.get) == "linear layers"
    assert shares["residual adds"] > 0 and shares["layer norms"] > 0
