"""Every on-disk name has one owner, and file operations on an output folder go through the storage interface
(`pipeline/storage.py`) and the format modules: a name spelled in a second module, or a file operation in a module
that is not allowed one, fails here with the place to fix."""

from __future__ import annotations

import ast
import re

from tests.services import ROOT

PACKAGES = ("pipeline", "jobs", "tasks", "shm_loader", "serve", "cli")

NAMES = {  # a pattern of string literals (not docstrings) that spells an on-disk name -> the one module that owns it
    r"(^|/)rows\.parquet$": "pipeline/segments.py",
    r"^index-": "pipeline/segments.py",
    r"^vectors\.npy$": "pipeline/segments.py",
    r"^deleted-": "pipeline/deletions.py",
    r"^sources-": "pipeline/deletions.py",
    r"^\.verified\.json$": "pipeline/checksum.py",
    r"^info\.json$": "pipeline/manifest.py",
    r"^current$": "pipeline/versions.py",
    r"^versions(/|$)": "pipeline/versions.py",
    r"^\.build-": "pipeline/versions.py",
    r"^build\.json$": "pipeline/compose.py",
    r"^\.rows\.parquet$": "pipeline/vectors.py",
    r"^plan\.json$": "pipeline/plan.py",
    r"^work$": "pipeline/plan.py",
    r"^chunk-": "pipeline/vectors.py",
    r"^runs\.jsonl$": "jobs/history.py",
    r"^report\.json$": "jobs/report.py",
    r"^job\.json$": "jobs/state.py",
    r"^failures$": "jobs/state.py",
    r"^\.embedctl\.lock": "jobs/locks.py",
    # not listed, as other modules spell the same word as something else: `chunks` (pipeline/plan.py's CHUNKS; a
    # result's key too) and `running` (jobs/state.py's RUNNING; a run's status too)
}

FILE_OPERATIONS = {"replace", "rename", "renames", "symlink", "link", "unlink", "remove", "rmdir", "removedirs",
                   "rmtree", "move", "copyfile", "copytree", "open", "write_text", "write_bytes", "read_text",
                   "read_bytes", "iterdir", "glob", "rglob", "mkdir", "makedirs", "mkdtemp", "mkstemp", "touch"}

STORAGE = {"pipeline/storage.py", "pipeline/fsutil.py", "pipeline/s3.py"}  # the interface, the local backend's file
# primitives, and the S3 backend (its local cache of objects)
ALLOWED = {  # module -> the file operations it may call, and why
    "pipeline/checksum.py": {"open"},  # hashes a local copy of a file (`Storage.local_path`)
    # inputs and private folders, not output folders
    "pipeline/corpus.py": {"open", "rglob", "glob"},  # the corpus (input Parquet files)
    "pipeline/models.py": {"read_text"},  # model folders
    "jobs/specfile.py": {"read_text"},  # the job spec file
    "jobs/locks.py": {"read_text"},  # /proc (whether a lock holder is alive); its flock file OUT/.embedctl.lock
    # is opened by py-filelock, not here: an flock needs a real local file (a remote output folder's lock is Redis)
    "cli/query.py": {"read_bytes"},  # a queries file named on the command line
    "cli/common.py": {"open"},  # /dev/null
    "serve/__main__.py": {"mkdtemp", "rmtree"},  # the server's private metrics folder
}


CLIMBING: set[str] = set()  # modules that may find an output folder by `.parent.parent` (storage.grandparent does)


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    for node in ast.walk(tree):  # attribute docstrings: a string statement after an assignment
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            found.add(id(node.value))
    return found


def _strings(tree: ast.AST):
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def test_each_on_disk_name_is_spelled_in_its_owner_only():
    wrong, seen = [], {pattern: [] for pattern in NAMES}
    for module, tree in _modules():
        for line, text in _strings(tree):
            for pattern, owner in NAMES.items():
                if re.search(pattern, text):
                    seen[pattern].append(module)
                    if module != owner:
                        wrong.append(f"{module}:{line} spells {text!r}, a name {owner} owns: use its constant or "
                                     "function")
    assert not wrong, "\n".join(wrong)
    assert all(seen.values()), f"names no module spells (stale patterns): {[p for p, m in seen.items() if not m]}"


def _operation(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Name) and func.id == "open":
        return "open"
    if isinstance(func, ast.Attribute) and func.attr in FILE_OPERATIONS:
        base = func.value
        if (isinstance(base, ast.Name) and base.id == "storage") or (isinstance(base, ast.Attribute)
                                                                     and base.attr == "storage"):
            return None  # the storage interface itself
        if func.attr == "open" and not (isinstance(base, ast.Name) and base.id in ("os", "io", "gzip")):
            return None  # a method named open (a reader's, the index set's): not a file
        if func.attr in ("replace", "remove", "move", "link") and not (isinstance(base, ast.Name)
                                                                       and base.id in ("os", "shutil")):
            return None  # str.replace, list.remove, dataclasses.replace, ...
        return func.attr
    return None


def test_file_operations_go_through_the_storage_interface():
    wrong = []
    for module, tree in _modules():
        if module in STORAGE or module.startswith("shm_loader/"):  # shared memory segments, not output folders
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (op := _operation(node)) is not None \
                    and op not in ALLOWED.get(module, set()):
                wrong.append(f"{module}:{node.lineno} calls {op}(): read, write, list and delete output folders "
                             "through pipeline.storage.Storage")
    assert not wrong, "\n".join(wrong)


def test_no_module_finds_the_output_folder_by_climbing_parents():
    found = [f"{module}:{n}" for module, _tree in _modules() if module not in CLIMBING
             for n, line in enumerate((ROOT / module).read_text().splitlines(), 1) if ".parent.parent" in line]
    assert not found, f".parent.parent finds an output folder at {found}: the storage of the folder knows it"
