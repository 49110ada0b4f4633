"""Request and response shapes: OpenAI's embeddings API, embedctl's search, and OpenAI's error body.

Extensions to OpenAI's embeddings request (ignored by clients that do not send them): `instruction`, a task put
before every input in the model's instruction format (the Qwen3 `Instruct: ...\\nQuery:` template; as given for
other models), and `prefix`, a text put before every input as it is (what an index records as its query prefix).

Requests are parsed by pydantic's JSON parser into strict models: a number field takes a JSON integer only (not
`true`, `12.0` or `"12"`: Python's bool is an int, and lax parsing would coerce the others), a text field a JSON
string only, and a string holding a lone surrogate escape (`"\\ud800"`, not Unicode) is refused as invalid JSON
instead of reaching the tokenizer.
"""

from __future__ import annotations

import base64
import json
from typing import ClassVar, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

MAX_DIM = 65_536
"""Most dimensions a request may name (no embedding model has more): a bound that keeps a huge JSON integer a 400."""
MAX_EF = 100_000
"""Largest HNSW search breadth (`ef`) a search may ask for; 2**63 and above overflowed in the index (a 500)."""


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    SHAPES: ClassVar[dict[str, str]] = {  # what a union field takes, for the error message
        "input": "a string, a list of strings, a list of token ids or a list of lists of token ids (token ids are "
                 "JSON integers: not booleans, floats or strings)"}

    input: str | list[str] | list[int] | list[list[int]]
    model: str
    dimensions: int | None = Field(default=None, le=MAX_DIM)  # and at most the model's (checked when served)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    instruction: str | None = None
    prefix: str | None = None


MAX_SHORTLIST = 100_000
"""Most funnel candidates a request may ask for per segment."""


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    SHAPES: ClassVar[dict[str, str]] = {"query": "a string or a list of strings"}

    index: str
    query: str | list[str]
    k: int = Field(default=10, ge=1, le=10_000)
    dim: int | None = Field(default=None, le=MAX_DIM)
    ef: int | None = Field(default=None, ge=1, le=MAX_EF)
    funnel: int | None = Field(default=None, ge=1, le=MAX_DIM)  # shortlist in this dim, re-rank at the full dim
    shortlist: int | None = Field(default=None, ge=1, le=MAX_SHORTLIST)
    instruction: str | None = None


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", close: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.close = close  # answer with `Connection: close` (the client's request was not read to its end)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"connection", b"close")] if self.close else []

    def payload(self) -> bytes:
        return json.dumps(self.body()).encode()


async def send_error(send, error: ApiError) -> None:
    """Answer `error` through an ASGI `send` (where no app's exception handler is around to do it)."""
    body = error.payload()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *error.headers()]})
    await send({"type": "http.response.body", "body": body})


class JSON(Response):
    """A JSON response written by orjson: float32 arrays are written straight from numpy, each number in the
    shortest form that reads back to the same float32 (what a list of Python floats costs several times over)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_vector(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    """A vector as OpenAI returns it: a list of floats (a float32 array, written by `JSON`), or base64 of
    little-endian float32 (what the client decodes with numpy.frombuffer(..., dtype="float32"))."""
    if encoding_format == "base64":
        data = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        return base64.b64encode(data).decode("ascii")
    return np.ascontiguousarray(vector, dtype=np.float32)

