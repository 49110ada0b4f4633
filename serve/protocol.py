"""Request and response shapes: OpenAI's embeddings API, embedctl's search, and OpenAI's error body.

Extensions to OpenAI's embeddings request (ignored by clients that do not send them): `instruction`, a task put
before every input in the model's instruction format (the Qwen3 `Instruct: ...\\nQuery:` template; as given for
other models), and `prefix`, a text put before every input as it is (what an index records as its query prefix).
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[int] | list[list[int]]
    model: str
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    instruction: str | None = None
    prefix: str | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str
    query: str | list[str]
    k: int = Field(default=10, ge=1, le=10_000)
    dim: int | None = None
    ef: int | None = Field(default=None, ge=1)
    instruction: str | None = None


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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

