"""`embedctl serve`: an OpenAI-compatible embedding and search service on the shared-memory weights.

`python -m embedctl.serve` (started by the CLI, which publishes the weights first) runs uvicorn with N worker
processes; each runs `serve.app.create_app`: the model attached from shared memory, the indexes memory-mapped,
requests merged into token-budget batches. Imports `pipeline/` and `shm_loader/` only (DESIGN.md, "Boundaries").
"""
