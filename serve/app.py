"""The ASGI app of `embedctl serve`: OpenAI's `/v1/embeddings` and `/v1/models`, `/v1/search` over published
indexes, `/health` and `/metrics`.

One app runs in each worker process. At start-up it loads in the background (attaching the model's weights from
shared memory when they are published, opening and checking every index) while `/health` answers 503; once
ready, requests are served from that one model, merged into batches (`serve.batcher`). Errors have OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, and never carry a stack trace. A request's headers and body
have their deadlines (--header-timeout, --body-timeout) in serve.connection, which holds them whether or not the app
reads the body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from embedctl.pipeline.errors import ConfigError, EmbedctlError
from embedctl.serve import metrics
from embedctl.serve.batcher import Overloaded
from embedctl.serve.config import ServeConfig
from embedctl.serve.engine import Engine
from embedctl.serve.indexes import ServedIndexes, UnknownIndex
from embedctl.serve.protocol import JSON, ApiError, EmbeddingRequest, SearchRequest, encode_vector, send_error
from embedctl.settings import setting

LOG = logging.getLogger("embedctl.serve")

ROUTES = ("/v1/embeddings", "/v1/search", "/v1/models", "/health", "/metrics")
OPEN_ROUTES = ("/health",)  # answered without the API key
DRAIN = 64 * 1024 * 1024
"""An oversized body up to this size is read and dropped before the 413 (larger ones: the connection is closed)."""


class ServerState:
    """What one worker serves: the model (once loaded) and the indexes."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.indexes = ServedIndexes(config.indexes, verify=config.verify)
        self.engine: Engine | None = None
        self.profile = None
        self.error: str | None = None
        self.started = time.time()
        self.model_names = {config.model, Path(config.model).name}  # what clients may send as `model`
        self.phases: dict[str, float] = {}  # seconds of each start-up step (logged when ready)
        self.device = None
        self.fingerprint = ""
        self._slot = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.error is None

    def require(self) -> Engine:
        if self.error is not None:
            raise ApiError(503, f"the server could not start: {self.error}", type="server_error", code="not_ready")
        if self.engine is None:
            raise ApiError(503, "the model is still loading; retry when GET /health answers 200",
                           type="server_error", code="not_ready")
        return self.engine


    def _load_model(self) -> Engine:
        """The worker's encoder (in a thread: attaching or loading takes a while, /health answers meanwhile)."""
        started = time.time()
        import torch

        from embedctl.pipeline.encoder import load_encoder
        from embedctl.pipeline.loader import import_model_code
        from embedctl.pipeline.models import ModelRef, read_profile, resolve_model

        ref = ModelRef(self.config.model, Path(self.config.model_path)) if self.config.model_path \
            else resolve_model(self.config.model)
        self.profile = read_profile(ref.path)
        self.fingerprint = ref.fingerprint
        import_model_code(self.profile.transformer_path)  # the architecture's module: seconds, paid by any load
        self.phases["imports"] = time.time() - started

        torch.set_num_threads(self.config.torch_threads(len(os.sched_getaffinity(0))))
        device, self._slot = worker_device(self.config)
        def load():
            return load_encoder(ref, device=device, dtype=self.config.dtype, shm=self.config.shm,
                                batch_tokens=self.config.batch_tokens)

        encoder = load()
        self.device = str(encoder.device)
        self.phases["model"] = time.time() - started - self.phases["imports"]
        LOG.info("worker %d: %s on %s, weights from %s", os.getpid(), ref.name, encoder.device, encoder.source)
        return Engine(encoder, self.config.cache, self.config.batch_wait_ms / 1000, self.config.max_queue,
                      on_batch=metrics.batch, on_cache=metrics.cache, reload=load)

    async def load(self) -> None:
        try:
            engine = await asyncio.to_thread(self._load_model)
            await self.indexes.load(self.fingerprint, self.config.model)
        except EmbedctlError as exc:
            self.error = str(exc)
            LOG.error("worker %d cannot serve: %s", os.getpid(), exc)
            return
        except Exception as exc:  # noqa: BLE001 - reported on /health, logged with its trace
            self.error = f"{type(exc).__name__}: {exc}"
            LOG.exception("worker %d cannot serve", os.getpid())
            return
        engine.start()
        self.engine = engine
        total = time.time() - self.started
        self.phases["indexes"] = total - sum(self.phases.values())
        LOG.info("worker %d ready in %.2fs (imports %.2fs, tokenizer and weights %.2fs, indexes %.2fs): %s",
                 os.getpid(), total,
                 self.phases["imports"], self.phases["model"], self.phases["indexes"],
                 ", ".join(f"{n} {i.reader.dir.name}" for n, i in self.indexes.by_name.items()) or "no indexes")

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        loading = asyncio.create_task(self.load())
        try:
            yield
        finally:
            loading.cancel()
            if self.engine is not None:
                await self.engine.close()
            metrics.process_ended(os.getpid())


def worker_device(config: ServeConfig) -> tuple[str, object]:
    """The device of this worker: on a host with several GPUs each worker claims one (a lock file per GPU, held
    while the worker lives), so N workers on N GPUs use one GPU each; otherwise `--device` as given."""
    from embedctl.pipeline.loader import process_device, resolve_device

    device = resolve_device(config.device)
    if device.type != "cuda" or device.index is not None:
        return str(device), None
    import torch
    from filelock import FileLock, Timeout

    count = torch.cuda.device_count()
    for attempt in range(count * 2):
        gpu = attempt % count
        lock = FileLock(f"/tmp/embedctl-serve-{config.port}-gpu{gpu}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        return process_device("cuda", gpu, count), lock
    return process_device("cuda", 0, count), None  # more workers than GPUs: they share the first one


class Guard:
    """Pure ASGI middleware in front of every route: the API key, the body's size limit, and the request metrics."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = [500]
        started = time.perf_counter()

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope["headers"])
            if self.api_key is not None and path not in OPEN_ROUTES and not self._authorised(headers):
                # `close`: the body is not read (and serve.connection closes a connection answered before its body is in)
                return await send_error(sending, ApiError(401, "Incorrect or missing API key: send the header "
                                                          "`Authorization: Bearer KEY` with the server's --api-key",
                                                          code="invalid_api_key", close=True))
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                if int(declared) <= DRAIN:  # read it away (by --body-timeout), so that a client still sending gets
                    await _drain(receive)  # the answer
                return await send_error(sending, _too_large(self.max_body))
            received, complete = [0], [False]

            async def receiving():
                if complete[0]:  # the body is in: what follows is the disconnect, whenever it comes
                    return await receive()
                message = await receive()
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > self.max_body:
                        raise _too_large(self.max_body)
                    complete[0] = not message.get("more_body", False)
                return message

            await self.app(scope, receiving, sending)
        finally:
            if route != "/metrics":
                metrics.REQUESTS.labels(route, str(status[0])).inc()
                metrics.LATENCY.labels(route).observe(time.perf_counter() - started)

    def _authorised(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.api_key)


async def _drain(receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server's limit of {limit} bytes; send fewer or "
                    "shorter inputs per request (or raise --max-body)", code="request_too_large", close=True)


def _error_response(error: ApiError, route: str) -> JSONResponse:
    metrics.ERRORS.labels(route, error.code or error.type).inc()
    return JSONResponse(error.body(), status_code=error.status,
                        headers={"connection": "close"} if error.close else None)


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _validation_message(exc: ValidationError, model) -> str:
    """One line for the first error: the field, and what it takes or what was wrong with the value."""
    first = exc.errors()[0]
    loc, kind = first["loc"], first["type"]
    if kind == "json_invalid":
        error = first["ctx"]["error"]
        hint = ""
        if "surrogate" in error or "hex escape" in error or "unicode" in error:  # what pydantic's parser says of them
            hint = " (texts must be Unicode: UTF-8, and a \\ud800-\\udfff escape only as half of a surrogate pair)"
        return f"the request body is not valid JSON: {error}{hint}"
    if not loc:
        return "the request body must be a JSON object"
    if len(loc) > 1 and loc[0] in model.SHAPES:  # one error per member of the union: name what the field takes
        return f"invalid request: {loc[0]} must be {model.SHAPES[loc[0]]}"
    message = f"invalid request: {'.'.join(map(str, loc))}: {first['msg']}"
    return message if kind in ("missing", "extra_forbidden") else f"{message}, got {_shown(first['input'])}"


async def _parse(request: Request, model):
    """The body as `model`, parsed strictly (serve.protocol), or a 400 in OpenAI's shape naming the field."""
    try:
        return model.model_validate_json(await request.body() or b"null")
    except ValidationError as exc:
        first = exc.errors()[0]["loc"]
        raise ApiError(400, _validation_message(exc, model), param=str(first[0]) if first else None) from None


def _texts(value, name: str) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ApiError(400, f"'{name}' is empty: give at least one text", param=name)
    blank = next((i for i, t in enumerate(texts) if not t.strip()), None)
    if blank is not None:
        raise ApiError(400, f"'{name}' item {blank} is empty; every input must hold text", param=name)
    return texts


def _log_to_stderr() -> None:
    """embedctl's log lines beside uvicorn's, in its format (uvicorn configures only its own loggers)."""
    root = logging.getLogger("embedctl")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
        root.addHandler(handler)
        root.setLevel(setting("log_level").upper())
        root.propagate = False


def _funnel_of(req: SearchRequest, reader, config: ServeConfig) -> tuple[int | None, int | None]:
    """(funnel dim, shortlist) of a search: the request's, else the server's default (`--funnel`) unless the request
    names a `dim`; a funnel the index cannot run is a 400 naming `funnel`."""
    from embedctl.pipeline.defaults import DEFAULT_SHORTLIST

    if req.funnel is not None and req.dim is not None:
        raise ApiError(400, "give dim or funnel, not both: a funnel searches funnel's dim and re-ranks at the full "
                            "dim", param="funnel")
    funnel = req.funnel if req.funnel is not None else config.funnel if req.dim is None else None
    if funnel is None:
        if req.shortlist is not None:
            raise ApiError(400, "shortlist needs funnel (the dim whose HNSW shortlists)", param="shortlist")
        return None, None
    shortlist = req.shortlist or config.shortlist or DEFAULT_SHORTLIST
    try:
        reader.check_funnel(funnel, req.k, shortlist, req.index)
    except ConfigError as exc:
        raise ApiError(400, str(exc), param="shortlist" if shortlist < req.k else "funnel") from None
    return funnel, shortlist


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """The app of one worker process (`uvicorn --factory embedctl.serve.app:create_app` reads the settings from
    EMBEDCTL_SERVE_CONFIG)."""
    config = config or ServeConfig.from_env()
    _log_to_stderr()
    state = ServerState(config)
    app = FastAPI(title="embedctl", lifespan=state.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(Guard, api_key=config.api_key, max_body=config.max_body)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error_response(exc, request.url.path)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        return _error_response(ApiError(429, f"the server is busy ({exc}); retry shortly", type="rate_limit_error",
                                        code="overloaded"), request.url.path)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect):
        # the client hung up before its body was in: nobody reads the answer, and nothing went wrong here
        return Response(status_code=499)  # nginx's "client closed request", for the metrics

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return _error_response(ApiError(404, f"no route {request.method} {request.url.path}; see the README's "
                                             "serving section", code="unknown_route"), "other")

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc):
        return _error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                        code="method_not_allowed"), request.url.path)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        LOG.exception("internal error on %s", request.url.path)
        return _error_response(ApiError(500, "internal server error (see the server's log)", type="server_error",
                                        code="internal_error"), request.url.path)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req: EmbeddingRequest = await _parse(request, EmbeddingRequest)
        engine = state.require()
        if req.model not in state.model_names:
            raise ApiError(404, f"The model `{req.model}` does not exist: this server serves `{config.model}`",
                           param="model", code="model_not_found")
        if req.dimensions is not None and not 0 < req.dimensions <= engine.dim:
            raise ApiError(400, f"dimensions must be between 1 and the model's {engine.dim}, got {req.dimensions}",
                           param="dimensions")
        if req.instruction is not None and req.prefix is not None:
            raise ApiError(400, "give `instruction` or `prefix`, not both", param="instruction")
        tokens_given = isinstance(req.input, list) and bool(req.input) and not isinstance(req.input[0], str)
        count = 1 if isinstance(req.input, str) or (tokens_given and isinstance(req.input[0], int)) else len(req.input)
        if count > config.max_inputs:
            raise ApiError(400, f"{count} inputs in one request; at most {config.max_inputs} (--max-inputs)",
                           param="input")
        try:  # Overloaded becomes 429 in its handler
            if tokens_given:
                if req.instruction or req.prefix:
                    raise ApiError(400, "`instruction` and `prefix` apply to texts, not to token ids",
                                   param="instruction")
                sequences = [req.input] if isinstance(req.input[0], int) else req.input
                result = await engine.embed_tokens(sequences)
            else:
                texts = _texts(req.input, "input")
                if req.prefix is not None:
                    prefix = req.prefix
                elif req.instruction is not None:
                    from embedctl.pipeline.models import format_instruction

                    prefix = format_instruction(req.instruction, state.profile.instruction_format)
                else:
                    prefix = state.profile.document_prefix(None)
                result = await engine.embed_texts(texts, prefix)
        except ConfigError as exc:
            raise ApiError(400, str(exc), param="input") from None
        vectors = result.vectors
        if req.dimensions is not None and req.dimensions < engine.dim:
            from embedctl.pipeline.index import slice_normalise

            vectors = slice_normalise(vectors, req.dimensions)
        metrics.TOKENS.labels("/v1/embeddings").inc(result.tokens)
        return JSON({
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
                     for i, v in enumerate(vectors)],
            "model": req.model,
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
        })

    @app.post("/v1/search")
    async def search(request: Request):
        req: SearchRequest = await _parse(request, SearchRequest)
        engine = state.require()
        try:
            served = state.indexes.get(req.index)
        except UnknownIndex as exc:
            raise ApiError(404, str(exc), param="index", code="index_not_found") from None
        reader = await served.current()  # this request keeps this version to its end
        info = reader.info
        queries = _texts(req.query, "query")
        if req.dim is not None and req.dim not in reader.dims:
            raise ApiError(400, f"dim {req.dim} is not indexed in {req.index}; choose one of "
                                f"{', '.join(map(str, reader.dims))}", param="dim")
        funnel, shortlist = _funnel_of(req, reader, config)
        if len(queries) > config.max_inputs:
            raise ApiError(400, f"{len(queries)} queries in one request; at most {config.max_inputs}", param="query")
        prefix = info.query_prefix_for(req.instruction)
        embedded = await engine.embed_texts(queries, prefix)
        results = await asyncio.to_thread(reader.search, embedded.vectors, req.k, req.dim, req.ef, funnel, shortlist)
        metrics.TOKENS.labels("/v1/search").inc(embedded.tokens)
        return JSON({
            "object": "list",
            "index": req.index,
            "version": reader.dir.name,
            "model": config.model,
            "dim": info.dim if funnel else req.dim or reader.dims[0],
            **({"funnel": funnel, "shortlist": shortlist} if funnel else {}),
            "data": [{"query": q, "hits": [h.to_dict() for h in hits]} for q, hits in zip(queries, results,
                                                                                           strict=True)],
            "usage": {"prompt_tokens": embedded.tokens, "total_tokens": embedded.tokens},
        })

    @app.get("/v1/models")
    async def models():
        engine = state.require()
        return {"object": "list", "data": [{
            "id": config.model, "object": "model", "created": int(state.started), "owned_by": "embedctl",
            "dim": engine.dim, "max_length": engine.encoder.max_length, "fingerprint": state.fingerprint,
            "instruction_format": state.profile.instruction_format,
            "indexes": state.indexes.names(),
        }]}

    @app.get("/health")
    async def health():
        if state.ready:
            versions = {name: index.reader.dir.name for name, index in state.indexes.by_name.items()
                        if index.reader is not None}
            return {"status": "ok", "model": config.model, "device": state.device, "pid": os.getpid(),
                    "indexes": versions}
        status = "failed" if state.error else "loading"
        return JSONResponse({"status": status, "error": state.error}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    return app
