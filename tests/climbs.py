"""Trace which of embedctl's files a command enters, in order, and where the flow climbs back up a layer.

A *climb* is a call from a package into a function of a package above it (DESIGN.md, "Boundaries": the CLI above
jobs, serve and tasks, above pipeline, above shm_loader): a callback handed down (progress, a hook) counts, as
its call crosses the layers upwards at run time. Each distinct (calling line, called function) counts once.

    python -m tests.climbs index CORPUS --out DIR --model minilm      # an embedded `embedctl index`
    python -m tests.climbs embeddings                                  # one POST /v1/embeddings (minilm)

print one JSON object: {"files": [...], "climbs": [{"from": "file:line", "to": "file:function", "calls": n}]}.
tests/test_climbs.py runs both and holds the counts to the limits the README's Layout section gives.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import embedctl

RANK = {"embedctl": -1, "shm_loader": 0, "pipeline": 1, "jobs": 2, "serve": 2, "tasks": 3, "cli": 4}
"""The layers, lowest first (`embedctl/` holds the leaves below every package: settings, errors)."""


def _roots() -> dict[str, str]:
    """Folder of each package as imported (the checkout or an installed wheel)."""
    top = Path(embedctl.__file__).parent
    roots = {"embedctl": str(top) + "/"}
    for name in RANK:
        if name != "embedctl":
            module = __import__(f"embedctl.{name}", fromlist=["_"])
            roots[name] = str(Path(module.__file__).parent) + "/"
    return roots


class Tracer:
    def __init__(self, roots: dict[str, str] | None = None):
        self.roots = roots or _roots()
        self.files: list[str] = []
        self.climbs: dict[tuple[str, str], int] = {}
        self.recording = False

    def package(self, filename: str) -> str | None:
        best = None
        for name, root in self.roots.items():  # the longest root wins (a package folder inside another)
            if filename.startswith(root) and (best is None or len(root) > len(self.roots[best])):
                best = name
        return best

    def _name(self, filename: str) -> str:
        package = self.package(filename)
        return f"{package}/{filename[len(self.roots[package]):]}"

    def __call__(self, frame, event, _arg) -> None:
        if event != "call" or not self.recording:
            return
        callee = frame.f_code.co_filename
        package = self.package(callee)
        if package is None:
            return
        name = self._name(callee)
        if name not in self.files:
            self.files.append(name)
        caller = frame.f_back
        while caller is not None and self.package(caller.f_code.co_filename) is None:
            caller = caller.f_back  # through the libraries (click, starlette, threads) to our nearest caller
        if caller is not None and RANK[package] > RANK[self.package(caller.f_code.co_filename)]:
            key = (f"{self._name(caller.f_code.co_filename)}:{caller.f_lineno}", f"{name}:{frame.f_code.co_name}")
            self.climbs[key] = self.climbs.get(key, 0) + 1

    @contextmanager
    def installed(self):
        threading.setprofile(self)
        sys.setprofile(self)
        try:
            yield self
        finally:
            sys.setprofile(None)
            threading.setprofile(None)

    def report(self) -> dict:
        return {"files": self.files,
                "climbs": [{"from": a, "to": b, "calls": n} for (a, b), n in self.climbs.items()]}


def _index(argv: list[str]) -> dict:
    from embedctl.cli import main

    tracer = Tracer()
    tracer.recording = True
    with tracer.installed():
        try:
            main(["index", *argv], standalone_mode=False)
        finally:
            tracer.recording = False
    return tracer.report()


def _embeddings() -> dict:

    from fastapi.testclient import TestClient

    from embedctl.serve.app import create_app
    from embedctl.serve.config import ServeConfig

    app = create_app(ServeConfig(model="minilm", shm="off"))
    tracer = Tracer()
    with tracer.installed(), TestClient(app) as client:  # the hooks first: the app's threads start in here
        deadline = time.monotonic() + 300
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)  # the model loads in the background
        client.post("/v1/embeddings", json={"model": "minilm", "input": ["warm up"]}).raise_for_status()
        tracer.recording = True
        answer = client.post("/v1/embeddings", json={"model": "minilm", "input": ["a domestic animal"]})
        tracer.recording = False
        answer.raise_for_status()
    return tracer.report()


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    result = _index(rest) if what == "index" else _embeddings()
    print("CLIMBS " + json.dumps(result))
