"""The CLI end to end: index -> info -> query, resume, up-to-date re-runs, one-line errors, a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from embedctl.cli import main
from tests import indexfiles

EMBEDCTL = str(Path(sys.executable).parent / "embedctl")


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory, sample_slice):
    """An index of 600 sample rows with MiniLM, built once through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "idx"
    result = invoke("index", sample_slice, "--out", out, "--model", "minilm", "--chunk-rows", 200, "--quiet",
                    "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_index_reports_what_it_did(built):
    out, report = built
    assert report["status"] == "published" and report["version"] == "v000001"
    assert report["rows_total"] == report["rows_embedded"] == report["rows_indexed"] == 600
    assert report["chunks_total"] == report["chunks_embedded"] == 3 and report["chunks_done_before"] == 0
    assert report["dims"] == [384, 256, 128]


def test_info_json_describes_the_index(built):
    out, _ = built
    result = invoke("info", out, "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["model"] == "minilm" and info["dims"] == [384, 256, 128] and info["rows"] == 600
    [segment] = info["paths"]["segments"]
    assert info["version"] == "v000001" and Path(segment["files"]["index-384.faiss"]).is_file()
    assert segment["rows"] == 600 and segment["deleted"] == 0
    human = invoke("info", out)
    assert "minilm" in human.stdout and "v000001" in human.stdout


def test_query_finds_a_known_row(built, sample_slice):
    out, _ = built
    row = pq.read_table(sample_slice).slice(123, 1).to_pylist()[0]
    for dim in ("384", "128"):
        result = invoke("query", out, row["text"], "-k", 3, "--dim", dim, "--json")
        assert result.exit_code == 0, result.output
        hits = json.loads(result.stdout)
        assert hits[0]["id"] == row["id"] and hits[0]["text"] == row["text"] and len(hits) == 3
    table = invoke("query", out, row["text"], "-k", 2)
    assert row["id"] in table.stdout.splitlines()[1] and "rank" in table.stdout


def test_query_file_gives_one_list_per_query(built, tmp_path):
    out, _ = built
    queries = tmp_path / "q.txt"
    queries.write_text("a small dog\n\nthe sea\n")
    result = invoke("query", out, "--file", queries, "-k", 2, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert len(data) == 2 and all(len(hits) == 2 for hits in data)


def test_rerun_of_a_complete_job_embeds_nothing(built, sample_slice):
    out, _ = built
    result = invoke("index", sample_slice, "--out", out, "--model", "minilm", "--chunk-rows", 200, "--json")
    report = json.loads(result.stdout)
    assert report["status"] == "up-to-date" and report["rows_embedded"] == 0 and report["version"] == "v000001"


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} | \
        {"current": os.readlink(out / "current")}


@pytest.mark.parametrize("args, code, message", [
    (["index", "{missing}", "--out", "{out}", "--model", "minilm"], 1, "does not exist"),
    (["index", "{corpus}", "--out", "{out}", "--model", "minilm", "--text-column", "body"], 1,
     "column 'body' is not in"),
    (["index", "{corpus}", "--out", "{out}", "--model", "minilm", "--id-column", "pos"], 1, "duplicate ids"),
    (["index", "{corpus}", "--out", "{out}", "--model", "minilm", "--id-column", "doc"], 1,
     "id column 'doc' is not in"),
    (["index", "{corpus}", "--out", "{out}", "--model", "nope-model"], 1, "unknown model"),
    (["index", "{corpus}", "--out", "{out}", "--model", "minilm", "--chunk-rows", "0"], 1, "chunk_rows must be"),
    (["index", "{corpus}", "--out", "{out}", "--model", "minilm", "--dims", "12,x"], 2, "comma-separated"),
    (["index", "{corpus}", "--out", "{out}", "--model", "minilm", "--dtype", "int3"], 1, "dtype must be"),
    (["index", "{corpus}", "--out", "{out}", "--model", "minilm", "--dims", "4096"], 1,
     "--dims 4096 is above the model's dim 384"),
    (["index", "{corpus}", "--out", "{out}", "--model", "minilm", "--dims", "128,64,128"], 1,
     "--dims lists 128 twice"),
    (["index", "{corpus}", "--out", "{corpus}", "--model", "minilm"], 1, "is a file; give a folder"),
    (["index", "{corpus}", "--out", "{out}", "--model", "minilm", "--instruction-format", "e5"], 2,
     "Invalid value for '--instruction-format'"),
    (["query", "{out}", "x", "--dim", "77"], 1, "--dim 77 is not indexed"),
    (["query", "{out}", "  "], 1, "query 1 is empty"),
    (["index", "{corpus}", "--out", "{out}", "--model", "minilm", "--max-length", "600"], 1,
     "--max-length 600 is above the 512 positions of minilm"),
    (["query", "{out}", "x", "-k", "0"], 1, "-k must be > 0"),
    (["query", "{out}"], 2, "give a query text or --file"),
    (["query", "{out}", "x", "--file", "{missing}"], 2, "not both"),
    (["query", "{missing}", "x"], 1, "does not exist"),
    (["info", "{missing}"], 1, "does not exist"),
])
def test_bad_input_is_one_line_and_leaves_the_index_untouched(built, sample_slice, tmp_path, args, code, message):
    out, _ = built
    before = _snapshot(out)
    values = {"missing": str(tmp_path / "missing.parquet"), "out": str(out), "corpus": str(sample_slice)}
    result = invoke(*[a.format(**values) for a in args])
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert message in result.stderr
    assert "Traceback" not in result.output
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert _snapshot(out) == before
    assert invoke("query", out, "dog", "--json").exit_code == 0


def test_wrong_corpus_for_an_existing_out_keeps_it_servable(built, tmp_path, write_corpus):
    out, _ = built
    before = _snapshot(out)
    bad = write_corpus({"id": ["a", "a"], "text": ["x", "y"]})
    result = invoke("index", bad, "--out", out, "--model", "minilm")
    assert result.exit_code == 1 and "duplicate ids" in result.stderr
    assert _snapshot(out) == before


def test_k_above_ef_search_returns_k_hits(built):
    out, _ = built
    result = invoke("query", out, "dog", "-k", 500, "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 500 and len({h["id"] for h in hits}) == 500  # efSearch (64) was raised to k


def test_unsigned_ids_beyond_int64_are_one_line(tmp_path, write_corpus):
    import pyarrow as pa

    corpus = write_corpus({"id": pa.array([1, 2**63 + 5], pa.uint64()), "text": ["a", "b"]})
    result = invoke("index", corpus, "--out", tmp_path / "o", "--model", "minilm")
    assert result.exit_code == 1 and "holds 9223372036854775813, above 9223372036854775807" in result.stderr
    small = write_corpus({"id": pa.array([1, 2], pa.uint64()), "text": ["a dog", "a cat"]}, name="small.parquet")
    ok = invoke("index", small, "--out", tmp_path / "ok", "--model", "minilm", "--dims", "64", "--quiet")
    assert ok.exit_code == 0, ok.output


def test_raw_instruction_format_puts_the_instruction_as_given(tmp_path, sample_slice):
    out = tmp_path / "raw"
    result = invoke("index", sample_slice, "--out", out, "--model", "minilm", "--dims", "128", "--quiet",
                    "--query-instruction", "query: ", "--instruction", "passage: ")
    assert result.exit_code == 0, result.output
    info = json.loads(invoke("info", out, "--json").stdout)
    assert info["instruction_format"] == "raw" and info["query_prefix"] == "query: "
    assert info["document_prefix"] == "passage: "
    qwen = invoke("index", sample_slice, "--out", tmp_path / "qwen", "--model", "minilm", "--dims", "128", "--quiet",
                  "--query-instruction", "find glosses", "--instruction-format", "qwen3")
    assert qwen.exit_code == 0, qwen.output
    info = json.loads(invoke("info", tmp_path / "qwen", "--json").stdout)
    assert info["query_prefix"] == "Instruct: find glosses\nQuery:" and info["document_prefix"] == ""


def test_env_vars_configure_options(tmp_path, sample_slice, monkeypatch):
    monkeypatch.setenv("EMBEDCTL_MODEL", "minilm")
    monkeypatch.setenv("EMBEDCTL_DIMS", "128")
    monkeypatch.setenv("EMBEDCTL_CHUNK_ROWS", "300")
    result = invoke("index", sample_slice, "--out", tmp_path / "o", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dims"] == [384, 128] and report["chunks_total"] == 2


def test_installed_command_runs_in_a_subprocess(tmp_path, sample_slice):
    out = tmp_path / "idx"
    index = subprocess.run([EMBEDCTL, "index", str(sample_slice), "--out", str(out), "--model", "minilm",
                            "--dims", "128", "--quiet"], capture_output=True, text=True, timeout=300)
    assert index.returncode == 0, index.stderr
    assert "published v000001" in index.stdout
    row = pq.read_table(sample_slice).slice(7, 1).to_pylist()[0]
    query = subprocess.run([EMBEDCTL, "query", str(out), row["text"], "-k", "1", "--json"], capture_output=True,
                           text=True, timeout=300)
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout)[0]["id"] == row["id"]
    bad = subprocess.run([EMBEDCTL, "index", str(tmp_path / "nothing.parquet"), "--out", str(out), "--model",
                          "minilm"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_interrupted_run_resumes_with_only_missing_chunks(tmp_path, sample_corpus):
    out = tmp_path / "idx"
    args = [EMBEDCTL, "index", str(sample_corpus), "--out", str(out), "--model", "minilm", "--chunk-rows", "150",
            "--dims", "128", "--threads", "1"]
    # SIGINT at its default in the child, as in a terminal: a test runner started in the background (`cmd &` in a
    # script) ignores it, and Python then keeps ignoring it, so Ctrl-C would never reach the run
    proc = subprocess.Popen(args + ["--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done = list(out.glob("work/*/chunks/chunk-*.npy"))
        if len(done) >= 3:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    complete = len(list(out.glob("work/*/chunks/chunk-*.npy")))
    assert 3 <= complete < 20
    assert not (out / "current").exists()
    assert not list(out.glob("work/*/chunks/.*.tmp"))  # no partial file left behind
    resumed = subprocess.run(args + ["--quiet", "--json"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["chunks_done_before"] == complete
    assert report["chunks_embedded"] == 20 - complete
    assert report["rows_indexed"] == 3000
    ids = indexfiles.live_ids(out)
    assert sorted(ids) == sorted(pq.read_table(sample_corpus).column("id").to_pylist())


def _commands(group, path=()):
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_every_option_of_every_command_has_its_embedctl_variable():
    import click

    from embedctl.cli import main

    missing = []
    for path, command in [((), main), *_commands(main)]:
        for param in command.params:
            if not isinstance(param, click.Option) or param.name in ("help", "version") or param.hidden:
                continue
            names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
            if not any(name.startswith("EMBEDCTL_") for name in names):
                missing.append(f"embedctl {' '.join(path)} {param.opts[0]}")
    assert missing == [], missing


def test_progress_draws_bars_only_on_a_terminal_and_one_line_a_stage_elsewhere(capsys):
    from embedctl.cli.common import tqdm_progress

    for terminal in (False, True):
        with tqdm_progress(quiet=False, terminal=terminal)("embed", 300, "rows", 100) as update:
            for _ in range(200):
                update(1)
            update.note("2 chunks")
    err = capsys.readouterr().err
    lines = err.split("\n")
    assert lines[0].startswith("embed: 300/300 rows (100 done before) in ") and lines[0].endswith(" s, 2 chunks")
    assert "\r" not in lines[0] and "\r" in err  # the terminal's bar redraws itself
    with tqdm_progress(quiet=True, terminal=False)("embed", 3) as update:
        update(3)
    assert capsys.readouterr().err == ""


def test_every_variable_that_is_no_option_is_read_by_the_settings_module_only():
    """`embedctl/settings.py` reads the EMBEDCTL_* variables that are not options (click reads those): no other
    module of the packages names one to a function (a reader or a helper of one), reads one from the environment,
    or reads the environment by a computed name; so each is parsed once, one way."""
    import ast
    import re

    from tests.services import ROOT

    variable = re.compile(r"EMBEDCTL_[A-Z_]+")
    readers = []
    for folder in ("embedctl", "pipeline", "jobs", "tasks", "shm_loader", "serve", "cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "embedctl" / "settings.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.Call) and not ast.unparse(node.func).endswith(".pop"):  # pop: a removal
                    named = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                             and variable.fullmatch(a.value)]
                    readers += [f"{where} passes {name}" for name in named]
                    func = ast.unparse(node.func)
                    if (func in ("os.getenv", "os.environ.get") or func.endswith("environ.get")) and node.args \
                            and not isinstance(node.args[0], ast.Constant):
                        readers.append(f"{where} reads the environment by a computed name")
                elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) \
                        and "environ" in ast.unparse(node.value):
                    readers.append(f"{where} reads {ast.unparse(node)}")
    assert readers == [], "\n".join(readers)
