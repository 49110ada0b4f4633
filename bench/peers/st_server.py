"""A plain FastAPI + sentence-transformers embedding server, the baseline of `python -m bench.serve`:

    python bench/peers/st_server.py MODEL_FOLDER PORT THREADS

OpenAI's /v1/embeddings request shape, `model.encode` on each request's texts (no batching across requests);
runs in its own virtual environment, made by the benchmark, and imports nothing of embedctl.
"""

import sys

import torch
import uvicorn
from fastapi import FastAPI
from sentence_transformers import SentenceTransformer

folder, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
model = SentenceTransformer(folder, device="cpu")
app = FastAPI()


@app.post("/v1/embeddings")
def embeddings(body: dict):  # a plain `def`: FastAPI runs it in its thread pool, requests overlap in threads
    texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
    vectors = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    return {"object": "list", "model": body.get("model"),
            "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
