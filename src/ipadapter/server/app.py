"""The REST API and the web page: routes, authentication, limits, and errors as JSON.

Every error is ``{"error": {"type": ..., "message": ...}}`` with a one-line message; nothing sends a
traceback. Every ``/v1`` route needs the bearer token when the server has one; ``/``, ``/healthz`` and the
API docs are open.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from swagger_ui_bundle import swagger_ui_path

from .. import __version__
from ..errors import IPAdapterError
from ..jobs.engine import Engine
from .bodies import (
    MAX_FRAMES,
    MAX_IMAGES,
    MAX_STEPS,
    REQUEST_SCHEMA,
    NotJson,
    Prepared,
    Served,
    build_request,
    parse_json,
)
from .config import ServerConfig
from .jobs import (
    DONE,
    FAILED,
    FINISHED,
    JobQueue,
    QueueFull,
    ShuttingDown,
    Stopper,
    Ticket,
    failure,
    job_view,
)
from .models import preload
from .results import encode_result

log = logging.getLogger("ipadapter.server")


class ApiError(Exception):
    """An HTTP error with its JSON body's type and message."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type, message, headers or {}


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        message = f"the request body is larger than this server's limit of {limit:,} bytes; send smaller (or fewer) images"
        super().__init__(413, "too_large", message, {"Connection": "close"})


class ListenError(IPAdapterError):
    """The server cannot listen on its host and port (busy, not this machine's address, no permission)."""


def error_response(
    status: int, type: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    message = " ".join(str(message).split())
    return JSONResponse({"error": {"type": type, "message": message}}, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes, by Content-Length or while a chunked body streams."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                return await error_response(400, "invalid_request", "bad Content-Length header")(
                    scope, receive, send
                )
            if declared > self.limit:
                return await BodyTooLargeResponse(self.limit)(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


def BodyTooLargeResponse(limit: int) -> JSONResponse:  # noqa: N802 - reads like the exception
    error = BodyTooLarge(limit)
    return error_response(error.status, error.type, error.message, error.headers)


# ---------------------------------------------------------------------------------------------------------
# The app


def _add_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from the swagger-ui-bundle-v2 package's files, so it works offline."""
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="ipadapter API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


def _page() -> str:
    return resources.files("ipadapter.server").joinpath("static/index.html").read_text(encoding="utf-8")


_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; connect-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_BODY_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": REQUEST_SCHEMA}}}}
_ERROR_DOC = {
    code: {
        "description": what,
        "content": {"application/json": {"example": {"error": {"type": kind, "message": "..."}}}},
    }
    for code, what, kind in (
        (400, "the body is not a JSON object", "invalid_json"),
        (401, "missing or wrong bearer token", "unauthorized"),
        (408, "the body did not arrive within the body deadline", "timeout"),
        (413, "the body is too large", "too_large"),
        (422, "an option or image is not usable", "invalid_input"),
        (429, "the queue is full (see Retry-After)", "queue_full"),
        (503, "the server is shutting down", "unavailable"),
    )
}


class Intake:
    """A ``/v1`` request's way in: its body read under a deadline, then a queue slot, then its job built."""

    def __init__(self, config: ServerConfig, served: Served, queue: JobQueue, stopper: Stopper) -> None:
        self.config, self.served, self.queue, self.stopper = config, served, queue, stopper

    async def read(self, request: Request) -> bytes:
        """The whole body within ``config.body_timeout`` s (else 408), or 503 as soon as the server stops.

        No queue slot is held while a body arrives, so slow senders cannot lock other clients out; a full queue
        still refuses before the body is read (it costs nothing).
        """
        self.queue.check()

        async def body() -> bytes:
            return b"".join([chunk async for chunk in request.stream()])

        try:
            return await self.stopper.first(body(), self.config.body_timeout)  # or 413, or the client left
        except asyncio.TimeoutError:  # (not the builtin before Python 3.11)
            seconds = self.config.body_timeout
            message = f"the request body did not arrive within {seconds:g} s (this server's body deadline)"
            raise ApiError(
                408, "timeout", message + "; send it faster, or smaller", {"Connection": "close"}
            ) from None

    async def admit(self, request: Request, *, kept: bool) -> Ticket:
        """Read the body, reserve a slot, decode the body (not cached on the request) into a job and queue it."""
        raw = await self.read(request)
        with self.queue.reserve() as slot:
            body = parse_json(raw)
            del raw
            prepared = await run_in_threadpool(_build, body, self.served)
            del body
            job, prepared.job = prepared.job, None  # the ticket owns the job and drops it after the run
            return slot.submit(job, lambda result: encode_result(result, prepared), kept=kept)

    async def answer(self, ticket: Ticket, request: Request) -> Response:
        """A synchronous request's answer: the result or the job's error; 499 (and the job cancelled) when the
        client leaves; 503 at once when the server stops."""
        loop = asyncio.get_running_loop()
        with self.stopper.watch() as wake:
            ticket.on_finish(lambda: loop.call_soon_threadsafe(wake.set))
            try:
                while not wake.is_set():
                    try:
                        await asyncio.wait_for(wake.wait(), 0.25)
                    except asyncio.TimeoutError:  # (not the builtin before Python 3.11)
                        if await request.is_disconnected():  # the client left: free its slot
                            self.queue.cancel(ticket)
                            return Response(status_code=499)
            finally:
                if not ticket.done:
                    self.queue.cancel(ticket)
        if ticket.status == DONE:
            return JSONResponse(job_view(ticket, self.queue)["result"])
        if ticket.status == FAILED and ticket.error is not None:
            return error_response(ticket.error.status, ticket.error.type, ticket.error.message)
        return error_response(503, "cancelled", "the job was cancelled (the server is shutting down)")


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app serving ``config``'s models; loads them now (or uses ``engine``) and attaches every adapter."""
    if engine is None:
        engine = Engine(config.device, config.dtype, compile=config.compile)
    served, models = preload(engine, config)
    models["limits"].update(
        max_images=MAX_IMAGES, max_frames=MAX_FRAMES, max_steps=MAX_STEPS, body_timeout=config.body_timeout
    )
    queue = JobQueue(
        engine, config.max_queue, keep_finished=config.keep_finished, keep_seconds=config.keep_seconds
    )
    stopper = Stopper(queue)
    app = _new_app(queue, stopper)
    app.state.queue, app.state.engine, app.state.served, app.state.stopper = queue, engine, served, stopper
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    _add_error_handlers(app)
    app.include_router(_v1_router(config, Intake(config, served, queue, stopper), models))
    _add_open_routes(app, config, queue)
    _add_docs(app)
    return app


def _new_app(queue: JobQueue, stopper: Stopper) -> FastAPI:
    """The bare app: its description, and a lifespan that stops the jobs and closes the queue at the end."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        yield
        stopper()
        await run_in_threadpool(queue.close)

    return FastAPI(
        title="ipadapter",
        version=__version__,
        description="IP-Adapter image prompts for Stable Diffusion: synchronous generation, a job queue and "
        'a web page. Images travel as base64; errors as {"error": {"type", "message"}}.',
        lifespan=lifespan,
        docs_url=None,  # served by _add_docs from local files: FastAPI's default page loads Swagger UI from a CDN
        redoc_url=None,
    )


def _authorization(config: ServerConfig) -> Any:
    """The dependency every ``/v1`` route has: the bearer token, when the server has one (else 401)."""
    bearer = HTTPBearer(auto_error=False, description="the token the server was started with")

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if config.token is None:
            return
        given = "" if credentials is None else credentials.credentials
        if credentials is None or not hmac.compare_digest(given.encode(), config.token.encode()):
            why = "no bearer token" if credentials is None else "wrong bearer token"
            raise ApiError(
                401,
                "unauthorized",
                f"{why}; send the header 'Authorization: Bearer <token>' with "
                "the token the server was started with",
                {"WWW-Authenticate": "Bearer"},
            )

    return authorized


def _v1_router(config: ServerConfig, intake: Intake, models: dict[str, Any]) -> APIRouter:
    """``/v1``: generate now, queue a job, what is served; the job routes (:func:`_add_job_routes`)."""
    queue = intake.queue
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorization(config))])

    @v1.post(
        "/generate",
        openapi_extra=_BODY_DOC,
        responses=_ERROR_DOC,
        summary="Generate now: the response holds the images (base64 PNGs) or the video (base64 GIF)",
    )
    async def generate(request: Request) -> Response:
        return await intake.answer(await intake.admit(request, kept=False), request)

    @v1.post(
        "/jobs",
        status_code=202,
        openapi_extra=_BODY_DOC,
        responses=_ERROR_DOC,
        summary="Queue a job: answers 202 with its id; poll GET /v1/jobs/{id}",
    )
    async def create_job(request: Request) -> JSONResponse:
        ticket = await intake.admit(request, kept=True)
        return JSONResponse(
            job_view(ticket, queue), status_code=202, headers={"Location": f"/v1/jobs/{ticket.id}"}
        )

    _add_job_routes(v1, config, queue)

    @v1.get("/models", summary="What is served: base, adapters, ControlNets, motion adapter, modes, device")
    def list_models() -> dict[str, Any]:
        return models

    return v1


def _add_job_routes(v1: APIRouter, config: ServerConfig, queue: JobQueue) -> None:
    """``GET`` and ``DELETE /v1/jobs/{id}``: a job's status, progress and result; cancel or forget it."""

    def find(job_id: str) -> Ticket:
        ticket = queue.get(job_id)
        if ticket is None:
            raise ApiError(
                404,
                "not_found",
                f"no job '{job_id}': it never existed, or it finished more than "
                f"{config.keep_seconds:g} s ago or behind {config.keep_finished} newer "
                "ones (finished jobs are kept that long)",
            )
        return ticket

    @v1.get("/jobs/{job_id}", summary="A job's status, progress while running, and its result when done")
    def get_job(job_id: str) -> dict[str, Any]:
        return job_view(find(job_id), queue)

    @v1.delete(
        "/jobs/{job_id}", summary="Cancel a job (a running one stops at its next step); forget a finished one"
    )
    def delete_job(job_id: str) -> dict[str, Any]:
        ticket = find(job_id)
        if ticket.status in FINISHED:
            queue.forget(ticket)
            return {"id": ticket.id, "status": ticket.status, "deleted": True}
        queue.cancel(ticket)
        return job_view(ticket, queue)


def _add_open_routes(app: FastAPI, config: ServerConfig, queue: JobQueue) -> None:
    """The routes that need no token: ``/healthz`` and the web page."""
    page = _page()

    @app.get("/healthz", summary="Liveness: 200 while the worker runs (open, no token needed)")
    def healthz() -> JSONResponse:
        stats = queue.stats()
        alive = stats.pop("worker_alive")
        body = {"status": "ok" if alive else "error", "auth": config.token is not None, "queue": stats}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)


def _build(body: dict[str, Any], served: Served) -> Prepared:  # a module-level seam (tests replace it)
    return build_request(body, served)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.type, e.message, e.headers)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull) -> JSONResponse:
        return error_response(429, "queue_full", str(e), {"Retry-After": str(e.retry_after)})

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, e: ShuttingDown) -> JSONResponse:
        return error_response(503, "unavailable", str(e), {"Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, e: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nobody reads it: the client left while sending its body

    @app.exception_handler(IPAdapterError)
    async def library_error(request: Request, e: IPAdapterError) -> JSONResponse:
        if isinstance(e, NotJson):
            return error_response(400, "invalid_json", str(e))
        f = failure(e)
        return error_response(f.status, f.type, f.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if e.status_code == 404:
            return error_response(404, "not_found", f"no route {where}; see /docs for the API", e.headers)
        if e.status_code == 405:
            return error_response(
                405, "method_not_allowed", f"{where}: method not allowed; see /docs", e.headers
            )
        return error_response(e.status_code, "http_error", str(e.detail), e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, "invalid_input", f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return error_response(500, "internal", f"internal error ({type(e).__name__}); see the server log")


# ---------------------------------------------------------------------------------------------------------
# Running it


class Server(uvicorn.Server):
    """uvicorn's server; on SIGINT or SIGTERM (or ``should_exit``) it runs the app's :class:`Stopper` before it
    waits for open connections, so every request waiting on a body or a job answers 503 at once, jobs are
    cancelled and the queue closes. ``on_listen`` is called once the server listens."""

    on_listen: Callable[[], None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_listen is not None:
            self.on_listen()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        stopper = getattr(getattr(self.config.app, "state", None), "stopper", None)
        if stopper is not None:
            stopper()
        await super().shutdown(sockets=sockets)


@contextmanager
def serve_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread (tests, benchmarks); yields its base URL.

    ``port`` 0 picks a free port. ``app.state.server`` is the :class:`Server` (``handle_exit`` stops it as a
    signal does). On exit the server stops (its lifespan closes the app's job queue).
    """
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    app.state.server = server
    thread = threading.Thread(target=server.run, name="ipadapter-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port``, not listening yet; ListenError (one line) if it cannot be bound."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise _listen_error(host, port, e) from None
    return sock


def _listen_error(host: str, port: int, error: OSError) -> ListenError:
    if error.errno == errno.EADDRINUSE:
        return ListenError(f"port {port} on {host} is in use; stop the other server or pick another --port")
    if error.errno == errno.EACCES:
        return ListenError(
            f"port {port} on {host}: permission denied (ports below 1024 need privileges); "
            "pick another --port"
        )
    why = error.strerror or str(error)
    return ListenError(f"cannot listen on {host} port {port} ({why}); check --host and --port")


def serve(config: ServerConfig) -> None:
    """Bind the port, load the models, then serve until interrupted (blocking).

    The port is bound before any model loads, so a busy port fails at once (ListenError: one line); "serving" is
    printed once the server listens.
    """
    sock = listen_socket(config.host, config.port)
    try:
        app = create_app(config)
        if config.token is None and config.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "serving on %s without a token: anyone who can reach port %d can use it",
                config.host,
                config.port,
            )
        port = sock.getsockname()[1]
        where = f"[{config.host}]" if ":" in config.host else config.host

        def listening() -> None:
            print(
                f"ipadapter: serving {config.base} with {', '.join(config.adapters)} on http://{where}:{port}/ "
                "(API docs: /docs)",
                flush=True,
            )

        settings = uvicorn.Config(
            app, host=config.host, port=port, log_level="info", timeout_graceful_shutdown=10
        )
        server = Server(settings)
        server.on_listen = listening
        try:
            server.run(sockets=[sock])
        except OSError as e:  # listen() failed: another socket that allows reuse holds the port
            if server.started:
                raise
            raise _listen_error(config.host, port, e) from None
    finally:
        sock.close()
