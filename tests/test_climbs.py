"""The two paths the README's Layout section walks climb back up the layers no more than it says.

tests/climbs.py traces a real embedded `embedctl index` and a real POST /v1/embeddings (minilm, in a fresh
interpreter each) and lists every call from a package into a function of a package above it.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.climbs import Tracer
from tests.services import ROOT

INDEX_CLIMBS = 5
"""Most climbs of an embedded `embedctl index` (README, Layout: each is named there)."""
EMBEDDINGS_CLIMBS = 1
"""Most climbs of one POST /v1/embeddings."""


def _trace(*args: str, cwd) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "climbs.py"), *args], capture_output=True,
                            text=True, timeout=900, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("CLIMBS ")]
    return json.loads(line.removeprefix("CLIMBS "))


def _shown(trace: dict) -> str:
    return "\n".join(f"{c['from']} -> {c['to']} ({c['calls']} calls)" for c in trace["climbs"])


def test_an_embedded_index_climbs_at_most_the_documented_times(tmp_path, sample_slice):
    trace = _trace("index", str(sample_slice), "--out", str(tmp_path / "out"), "--model", "minilm", "--dims", "128",
                   cwd=tmp_path)
    assert {"cli/index.py", "jobs/runner.py", "pipeline/encoder.py", "pipeline/index.py"} <= set(trace["files"])
    assert len(trace["climbs"]) <= INDEX_CLIMBS, _shown(trace)
    assert (tmp_path / "out" / "current").exists()


def test_a_request_for_embeddings_climbs_at_most_once(tmp_path):
    trace = _trace("embeddings", cwd=tmp_path)
    assert {"serve/app.py", "serve/engine.py", "pipeline/encoder.py"} <= set(trace["files"])
    assert len(trace["climbs"]) <= EMBEDDINGS_CLIMBS, _shown(trace)


def test_the_tracer_sees_a_callback_climb_and_not_a_call_down(tmp_path):
    """A callback handed down counts as a climb, a plain call down does not: the tracer is not blind."""
    for package, source in (("pipeline", "def call(callback):\n    return callback()\n"),
                            ("cli", "def up():\n    return 1\n\n\ndef down(low):\n    return low.call(up)\n")):
        (tmp_path / package).mkdir()
        (tmp_path / package / "mod.py").write_text(source)
    namespace_low, namespace_high = {}, {}
    exec(compile((tmp_path / "pipeline" / "mod.py").read_text(), str(tmp_path / "pipeline" / "mod.py"), "exec"),
         namespace_low)
    exec(compile((tmp_path / "cli" / "mod.py").read_text(), str(tmp_path / "cli" / "mod.py"), "exec"), namespace_high)
    low = type("low", (), {"call": staticmethod(namespace_low["call"])})
    tracer = Tracer(roots={name: f"{tmp_path}/{name}/" for name in ("pipeline", "cli")})
    tracer.recording = True
    with tracer.installed():
        assert namespace_high["down"](low) == 1
    assert tracer.report()["climbs"] == [{"from": "pipeline/mod.py:2", "to": "cli/mod.py:up", "calls": 1}]
    assert tracer.files == ["cli/mod.py", "pipeline/mod.py"]
