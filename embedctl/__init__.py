"""embedctl: batch text embedding into FAISS HNSW indexes, in-process or on Celery workers.

The wheel installs this one top-level package; its sub-packages live in folders at the root of the repository
(`pipeline/`, `jobs/`, `tasks/`, `shm_loader/`) and are mapped under this name by `pyproject.toml`:
`embedctl.pipeline`, `embedctl.jobs`, `embedctl.tasks`, `embedctl.shm_loader`. Code imports them only by
these names (a lint rule bans the bare ones), so no module is ever loaded twice.
"""
