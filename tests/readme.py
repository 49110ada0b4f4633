"""The README's command blocks, as the tests run them: exactly as printed, in a shell, from a folder that is not the
repository, and compared with the output the README shows.

A block is tested when an HTML comment right before it names it (invisible on GitHub):

    <!-- readme-test: id=tour-index -->            a block to run (bash) or to write to a file (other languages)
    <!-- readme-test: id=worker background ready=" ready." -->   a long-running command: started, awaited, stopped
    <!-- readme-test: id=tests skip="..." -->      never run, with the reason (the test command itself)
    <!-- readme-test: id=jobs-toml file=jobs.toml --> written to that file in the folder of the next blocks
    <!-- readme-test: id=s3-index in=tests/test_s3.py -->   run by that module (it needs a service of its own),
                                                           which checks that it ran all of its blocks

A ```text block right after a bash block is its expected stdout: lines must match, except that `...` alone on a
line stands for any number of lines, `...` inside a line for any text, and with `tolerance=X` on the command block
decimal numbers may differ by up to X (scores and recalls vary with the CPU's float rounding).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXECUTED: set[str] = set()
"""Ids of the blocks run, started or written in this session (test_readme checks that none was left out)."""
_DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(?P<body>.*?)\s*-->\s*$")
_FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
_FLOAT = re.compile(r"(?<![\w.])-?\d+\.\d+(?![\w.])")


@dataclass
class Block:
    """One fenced block of the README with its test options."""

    id: str
    lang: str
    code: str
    line: int
    options: dict = field(default_factory=dict)
    expected: str | None = None  # the ```text block that follows a command block


def _options(body: str) -> dict:
    options = {}
    for token in shlex.split(body):
        key, _, value = token.partition("=")
        options[key] = value if value else True
    return options


def parse(path: Path = README) -> tuple[dict[str, Block], list[int]]:
    """(blocks by id, line numbers of the command blocks that carry no test directive)."""
    lines = path.read_text().splitlines()
    blocks: dict[str, Block] = {}
    untested: list[int] = []
    pending: dict | None = None  # the directive waiting for its block
    last: Block | None = None  # the command block a following ```text block belongs to
    i = 0
    while i < len(lines):
        directive, fence = _DIRECTIVE.match(lines[i]), _FENCE.match(lines[i])
        if directive:
            pending = _options(directive["body"])
        elif not fence:
            if lines[i].strip():  # prose between: a directive or an output block belongs to nothing before it
                pending = last = None
        else:
            start, lang, body = i, fence["lang"], []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            code = "\n".join(body) + "\n"
            if lang == "text" and last is not None and pending is None:
                last.expected, last = code, None
            elif pending is not None:
                block = Block(id=pending.pop("id"), lang=lang, code=code, line=start + 1, options=pending)
                assert block.id not in blocks, f"README.md:{start + 1}: block id {block.id!r} used twice"
                blocks[block.id] = block
                last = block if lang == "bash" else None
            else:
                if lang in ("bash", "sh", "console", "toml"):
                    untested.append(start + 1)
                last = None
            pending = None
        i += 1
    return blocks, untested


def match_output(expected: str, actual: str, tolerance: float = 0.0) -> str | None:
    """None when `actual` matches `expected` (see the module doc), else a description of the first mismatch."""
    want = [line.rstrip() for line in expected.strip("\n").splitlines()]
    have = [line.rstrip() for line in actual.strip("\n").splitlines()]

    def line_matches(pattern: str, line: str) -> bool:
        numbers = _FLOAT.findall(pattern)
        regex = ""
        for piece in re.split(r"(\.\.\.|" + _FLOAT.pattern + ")", pattern):
            if piece == "...":
                regex += ".*?"
            elif piece and _FLOAT.fullmatch(piece):
                regex += r"(-?\d+\.\d+)" if tolerance else re.escape(piece)
            elif piece:
                regex += re.escape(piece)
        m = re.fullmatch(regex, line)
        if not m:
            return False
        if tolerance:
            return all(abs(float(a) - float(b)) <= tolerance for a, b in zip(m.groups(), numbers, strict=True))
        return True

    def walk(w: int, h: int) -> bool:
        if w == len(want):
            return h == len(have)
        if want[w] == "...":
            return any(walk(w + 1, k) for k in range(h, len(have) + 1))
        return h < len(have) and line_matches(want[w], have[h]) and walk(w + 1, h + 1)

    if walk(0, 0):
        return None
    for w, pattern in enumerate(want):
        if pattern == "...":
            break
        if w >= len(have) or not line_matches(pattern, have[w]):
            return f"line {w + 1}: expected {pattern!r}, got {have[w] if w < len(have) else '(no line)'!r}"
    return "the lines differ after a '...'"


def run(block: Block, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command block in bash (errexit, pipefail), exactly as printed."""
    EXECUTED.add(block.id)
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def check(block: Block, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a block and assert: exit 0, no traceback, and its output as the README shows it."""
    result = run(block, cwd, env, timeout)
    where = f"README.md:{block.line} ({block.id})"
    assert result.returncode == 0, f"{where} exited {result.returncode}:\n{result.stdout}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stdout + result.stderr, f"{where}:\n{result.stderr[-3000:]}"
    if block.expected is not None:
        mismatch = match_output(block.expected, result.stdout, float(block.options.get("tolerance", 0)))
        assert mismatch is None, f"{where}: {mismatch}\n--- printed:\n{result.stdout}"
    return result


def write(block: Block, folder: Path) -> Path:
    """Write a file block where the README says (its `file=` option, in `folder`)."""
    EXECUTED.add(block.id)
    path = folder / block.options["file"]
    path.write_text(block.code)
    return path


class Background:
    """A long-running README command (a worker, beat, a server) in its own process group."""

    def __init__(self, block: Block, cwd: Path, env: dict, log: Path):
        EXECUTED.add(block.id)
        self.block, self.log = block, log
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(["bash", "-c", block.code], cwd=cwd, env=env, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_ready(self, timeout: float = 180) -> Background:
        ready = self.block.options["ready"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready in self.text():
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"README.md:{self.block.line} ({self.block.id}) exited {self.proc.returncode}:\n"
                                     f"{self.text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"README.md:{self.block.line} ({self.block.id}) not ready in {timeout} s:\n"
                             f"{self.text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to the command (a Celery worker then finishes its tasks: a warm shutdown); after a minute, or
        once it exited, SIGKILL to whatever is left of its process group."""
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
