"""A client of a running `embedctl serve` (`embedctl query --server`, `embedctl eval --server`): plain HTTP and
JSON from the standard library, so a client loads neither torch nor an index."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np

from embedctl.pipeline.errors import ServerError

BATCH = 256
"""Texts per /v1/embeddings request."""


class ServerClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise ServerError(f"the server at {self.url} answered {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(f"cannot reach the server at {self.url} ({reason}); start it with `embedctl serve` or "
                              "check --server") from None
        except ValueError:
            raise ServerError(f"{self.url}{path} did not answer JSON: is --server an embedctl server?") from None

    def model(self) -> dict:
        """The served model (GET /v1/models): id, dim, fingerprint, indexes."""
        return self._call("GET", "/v1/models")["data"][0]

    def search(self, index: str, queries: list[str], k: int, dim: int | None = None, ef: int | None = None,
               instruction: str | None = None, funnel: int | None = None, shortlist: int | None = None) -> dict:
        body = {"index": index, "query": queries, "k": k}
        body.update({key: value for key, value in (("dim", dim), ("ef", ef), ("instruction", instruction),
                                                   ("funnel", funnel), ("shortlist", shortlist))
                     if value is not None})
        return self._call("POST", "/v1/search", body)

    def embed(self, texts: list[str], model: str, prefix: str = "") -> np.ndarray:
        """Full-dim vectors of `texts` with `prefix` put before each (float32, as the server computed them)."""
        parts = []
        for start in range(0, len(texts), BATCH):
            answer = self._call("POST", "/v1/embeddings", {"model": model, "input": texts[start:start + BATCH],
                                                           "encoding_format": "base64", "prefix": prefix})
            parts.extend(np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
                         for item in sorted(answer["data"], key=lambda d: d["index"]))
        return np.stack(parts).astype(np.float32)
