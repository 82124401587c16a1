"""The HTTP API: OpenAI's completions, chat completions and models, plus vLLM's runtime
adapter endpoints, over an `Engine`.

    app = create_app(engine, base_root="path/to/model", api_key="secret")

Every refusal is an OpenAI-style error body `{"error": {"message", "type", "param", "code"}}`
with its status (400 bad value, 401 key, 404 unknown model or route, 422 wrong type, 429
queue full). A streamed answer is server-sent events ending in `data: [DONE]`; a client that
disconnects has its request cancelled, which frees its batch slot.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from os import PathLike

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import LorakitError
from .adapters import folder_under
from .engine import Engine
from .errors import NotEnabled, ServeError, Unauthorized
from .events import Events
from .protocol import ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest
from .protocol import parse as parse_body
from .responses import Shape, error_body, model_card, sse
from .sequence import Failed, Finish, Piece, Sequence


@dataclass(frozen=True)
class Settings:
    """What the server allows: see `lorakit serve --help`."""

    base_root: str = ""  # where the base model came from, shown in /v1/models
    api_key: str | None = None
    allow_runtime_adapters: bool = False
    adapter_dir: str | PathLike | None = None
    unload_timeout_s: float = 60.0


def create_app(engine: Engine, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; it starts the engine's thread on startup if needed
    and closes the engine on shutdown."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.started:
            engine.start()
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    _add_auth(app, settings.api_key)
    _add_model_routes(app, engine, settings)
    _add_generation_routes(app, engine)
    _add_adapter_routes(app, engine, settings)
    return app


def _error(status: int, message: str, type_: str, code: str | None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def refused(request: Request, err: ServeError) -> JSONResponse:
        return _error(err.status, str(err), err.type, err.code)

    @app.exception_handler(LorakitError)
    async def invalid(request: Request, err: LorakitError) -> JSONResponse:
        return _error(400, str(err), "invalid_request_error", type(err).__name__)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = f"{err.detail}: {request.method} {request.url.path}"
        return _error(err.status_code, message, "invalid_request_error", "not_found"
                      if err.status_code == 404 else None)  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def wrong_type(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(422, str(err), "invalid_request_error", "invalid_type")


def _add_auth(app: FastAPI, api_key: str | None) -> None:
    """With an API key, every /v1 route needs `Authorization: Bearer <key>`."""
    if not api_key:
        return
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):  # noqa: ANN202 - starlette's signature
        given = request.headers.get("authorization", "").encode()
        if request.url.path.startswith("/v1") and not hmac.compare_digest(given, expected):
            err = Unauthorized("missing or wrong API key: send the header 'Authorization: Bearer "
                               "<key>' with the key the server was started with")  # fmt: skip
            return _error(err.status, str(err), err.type, err.code)
        return await call_next(request)


def _add_model_routes(app: FastAPI, engine: Engine, settings: Settings) -> None:
    created = int(time.time())

    @app.get("/v1/models")
    async def models() -> dict:
        base = engine.adapters.base_id
        cards = [model_card(base, settings.base_root or base, None, created)]
        for name, path in list(engine.adapters.paths.items()):
            if name in engine.adapters.served():
                cards.append(model_card(name, path, base, created))
        return {"object": "list", "data": cards}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.status()}


def _add_generation_routes(app: FastAPI, engine: Engine) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(engine, request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(engine, request, ChatRequest, chat=True)


async def _generate(engine: Engine, request: Request, kind: type, chat: bool) -> Response:
    body = parse_body(await request.body(), kind)
    job = body.to_job(engine)
    events = Events()
    seq = engine.submit(job, events.sink)
    shape = Shape(chat, body.model)
    if body.stream:
        stream = _stream(events, seq, shape, body.include_usage, request)
        return StreamingResponse(stream, media_type="text/event-stream")
    try:
        return await _whole(events, shape, request)
    finally:
        seq.cancel()  # nothing when it finished; frees the slot when the client left


async def _whole(events: Events, shape: Shape, request: Request) -> Response:
    pieces = []
    while (event := await events.next(request)) is not None:
        if isinstance(event, Piece):
            pieces.append(event.text)
        elif isinstance(event, Finish):
            return JSONResponse(shape.whole("".join(pieces), event))
        elif isinstance(event, Failed):
            return _error(500, event.message, "server_error", "generation_failed")
    return Response(status_code=499)  # the client is gone; nobody reads this


async def _stream(
    events: Events, seq: Sequence, shape: Shape, include_usage: bool, request: Request
) -> AsyncIterator[str]:
    try:
        if shape.chat:
            yield sse(shape.chunk(role=True))
        while (event := await events.next(request)) is not None:
            if isinstance(event, Piece):
                yield sse(shape.chunk(event.text))
                continue
            if isinstance(event, Finish):
                yield sse(shape.chunk(finish_reason=event.reason))
                if include_usage:
                    yield sse(shape.usage_chunk(event))
            elif isinstance(event, Failed):
                yield sse(error_body(event.message, "server_error", "generation_failed"))
            yield sse("[DONE]")
            return
    finally:
        seq.cancel()  # the client left (or the answer is over): free the slot


def _add_adapter_routes(app: FastAPI, engine: Engine, settings: Settings) -> None:
    def check_enabled() -> None:
        if not settings.allow_runtime_adapters:
            raise NotEnabled("runtime adapter loading is off; start the server with "
                             "--allow-runtime-adapters --adapter-dir DIR")  # fmt: skip

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> dict:
        check_enabled()
        body = parse_body(await request.body(), LoadAdapterRequest)
        folder = folder_under(settings.adapter_dir, body.lora_path)
        await run_in_threadpool(engine.add_adapter, body.lora_name, folder)
        return {"object": "lora_adapter", "id": body.lora_name, "status": "loaded"}

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> dict:
        check_enabled()
        body = parse_body(await request.body(), UnloadAdapterRequest)
        await run_in_threadpool(engine.remove_adapter, body.lora_name, settings.unload_timeout_s)
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}
