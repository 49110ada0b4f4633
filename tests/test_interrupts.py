"""Ctrl-C at the moments after a publish: the version stays published, the run is recorded as published, and the
command says so and exits 130 (never a failed record, a misleading "run again to resume", or a death by signal)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# The real CLI in a subprocess, with a SIGINT sent to itself at one exact point of the run.
HARNESS = textwrap.dedent("""
    import importlib, os, signal, sys
    point = sys.argv.pop(1)
    if point == "swap":  # just after `current` points to the new version, before retention and the run's records
        from embedctl.pipeline import versions
        real = versions.publish
        def publish(*args, **kwargs):
            target = real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGINT)
            return target
        versions.publish = publish
    else:  # the run has ended; the summary is being printed
        cli_index = importlib.import_module("embedctl.cli.index")
        real = cli_index.summary
        def summary(report):
            os.kill(os.getpid(), signal.SIGINT)
            return real(report)
        cli_index.summary = summary
    from embedctl.cli import main
    sys.argv[0] = "embedctl"
    main()
""")


@pytest.mark.parametrize("point", ["swap", "summary"])
def test_ctrl_c_after_the_swap_leaves_a_published_run_and_exits_130_saying_so(point, sample_slice, tmp_path):
    out = tmp_path / "idx"
    result = subprocess.run([sys.executable, "-c", HARNESS, point, "index", str(sample_slice), "--out", str(out),
                             "--model", "minilm", "--dims", "128", "--quiet"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 130, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"interrupted after the run: v000001 of {out} is published and current (600 rows); nothing "
                     "to resume"], result.stderr
    assert (out / "current").resolve().name == "v000001"
    history = [json.loads(line) for line in Path(out / "runs.jsonl").read_text().splitlines()]
    assert [h["status"] for h in history] == ["running", "published"]
    assert json.loads((next(out.glob("work/*/report.json"))).read_text())["status"] == "published"
