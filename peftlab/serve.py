"""``peftlab serve``: an HTTP server over several adapters on one base (FastAPI on uvicorn).

Routes: ``POST /v1/{adapter}/predict`` with ``{"texts": [...]}`` (or, for question answering,
``{"questions": [{"question", "context"}, ...]}``) answers ``{"adapter", "predictions"}``, the rows
``peftlab predict`` prints; ``GET /v1/adapters``; ``GET /health``; OpenAPI docs at ``/docs``.

Requests that arrive while the model is busy are batched together, up to ``max_batch`` inputs per
forward pass, grouped by adapter; with ``--shared-pass`` LoRA adapters on the shared backbone run it
once for all their rows (``peftlab.mixed``). One worker thread runs the model, so the event loop keeps
accepting requests. A bad request gets a 4xx with one ``{"error": "..."}`` line and never stops the
server; an input the model rejects fails its own request only.
"""

# no `from __future__ import annotations`: FastAPI reads the route functions' annotations at runtime
import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Optional

from .adapters import AdapterSet
from .errors import PeftlabError

log = logging.getLogger("peftlab")


@dataclass
class Limits:
    max_batch: int = 32  # inputs per request and per forward pass
    max_length: int = 20_000  # characters per text (question + context for question answering)
    max_request_bytes: int = 1_000_000
    batch_wait_ms: float = 2.0  # how long the first request of a batch waits for others


class RequestError(Exception):
    """A request the server refuses: HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_inputs(body: Any, task: str, limits: Limits) -> list:
    """The request's inputs (texts, or question/context dicts), or a RequestError saying what is wrong."""
    qa = task == "question_answering"
    key = "questions" if qa else "texts"
    if not isinstance(body, dict):
        raise RequestError(400, f"request body: expected a JSON object with {key!r}")
    extra = sorted(set(body) - {key})
    if extra:
        raise RequestError(400, f"request body: unexpected key(s) {extra}; this adapter ({task}) takes {key!r}")
    items = body.get(key)
    if not isinstance(items, list) or not items:
        raise RequestError(400, f"{key}: expected a non-empty list")
    if len(items) > limits.max_batch:
        raise RequestError(413, f"{key}: {len(items)} inputs; at most {limits.max_batch} per request")
    for n, item in enumerate(items):
        parts = _parts(item, qa, f"{key}[{n}]")
        if sum(len(p) for p in parts) > limits.max_length:
            raise RequestError(413, f"{key}[{n}]: longer than {limits.max_length} characters")
    return items


def _parts(item: Any, qa: bool, where: str) -> list[str]:
    if not qa:
        if not isinstance(item, str) or not item.strip():
            raise RequestError(400, f"{where}: expected a non-empty string")
        return [item]
    if not isinstance(item, dict) or set(item) - {"question", "context", "id"}:
        raise RequestError(400, f"{where}: expected an object with question and context")
    for field in ("question", "context"):
        if not isinstance(item.get(field), str) or not item[field].strip():
            raise RequestError(400, f"{where}.{field}: expected a non-empty string")
    return [item["question"], item["context"]]


class Batcher:
    """Collects concurrent requests and runs them in batches on one worker thread."""

    def __init__(self, adapters: AdapterSet, limits: Limits):
        self.adapters, self.limits = adapters, limits
        self.queue: Optional[asyncio.Queue] = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peftlab-model")

    async def submit(self, name: str, items: list) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((name, items, future))
        return await future

    async def run(self) -> None:
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        while True:
            pending = await self._collect(loop)
            outcomes = await loop.run_in_executor(self.executor, self._compute, pending)
            for (_, _, future), outcome in zip(pending, outcomes):
                if future.done():
                    continue  # the client went away
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> list[tuple]:
        pending = [await self.queue.get()]
        n, deadline = len(pending[0][1]), loop.time() + self.limits.batch_wait_ms / 1000
        while n < self.limits.max_batch:
            try:
                pending.append(self.queue.get_nowait() if loop.time() >= deadline else
                               await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            n += len(pending[-1][1])
        return pending

    def _compute(self, pending: list[tuple]) -> list[Any]:
        """Per request: its rows or the exception it gets. The requests run together (one batch per
        adapter, or LoRA adapters in shared passes when loaded for them); if that fails on an input,
        each request runs alone so only the bad one fails."""
        try:
            rows = self.adapters.predict_mixed([(name, item) for name, items, _ in pending for item in items],
                                               batch_size=self.limits.max_batch)
        except Exception:  # noqa: BLE001 - isolate the request that caused it
            return [self._alone(name, items) for name, items, _ in pending]
        outcomes, start = [], 0
        for _, items, _ in pending:
            outcomes.append(rows[start:start + len(items)])
            start += len(items)
        return outcomes

    def _alone(self, name: str, items: list) -> Any:
        try:
            return self.adapters.predict(name, items, batch_size=self.limits.max_batch)
        except PeftlabError as exc:
            return RequestError(422, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the server
            log.exception("serve: %s failed", name)
            return RequestError(500, f"{type(exc).__name__}: {exc}"[:500])


def create_app(adapters: AdapterSet, limits: Optional[Limits] = None) -> Any:
    """The FastAPI application over ``adapters``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    limits = limits or Limits()
    batcher = Batcher(adapters, limits)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.executor.shutdown(wait=False)

    app = FastAPI(title="peftlab serve", lifespan=lifespan,
                  description="Predictions from several peftlab adapters on one base model.")

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "adapters": len(adapters.predictors)}

    @app.get("/v1/adapters")
    async def list_adapters() -> dict:
        return {"adapters": adapters.describe(), "shared_bytes": adapters.shared_bytes}

    @app.post("/v1/{adapter}/predict", openapi_extra=_REQUEST_DOC)
    async def predict(adapter: str, request: Request) -> dict:
        if adapter not in adapters.predictors:
            raise RequestError(404, f"adapter {adapter!r}: not loaded (loaded: {', '.join(adapters.names())})")
        body = await _read_json(request, limits)
        items = check_inputs(body, adapters.predictors[adapter].task, limits)
        return {"adapter": adapter, "predictions": await batcher.submit(adapter, items)}

    return app


async def _read_json(request: Any, limits: Limits) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise RequestError(413, f"request body: larger than {limits.max_request_bytes} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limits.max_request_bytes:
            raise RequestError(413, f"request body: larger than {limits.max_request_bytes} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body: not valid JSON ({exc})"[:300]) from None
    except RecursionError:
        raise RequestError(400, "request body: JSON nested too deeply") from None


_REQUEST_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object",
    "description": '{"texts": [...]} for NER, classification and generation; '
                   '{"questions": [{"question": ..., "context": ...}]} for question answering.',
    "properties": {
        "texts": {"type": "array", "items": {"type": "string"}},
        "questions": {"type": "array", "items": {"type": "object", "properties": {
            "question": {"type": "string"}, "context": {"type": "string"}}}},
    }}}}}}


def add_commands(sub: Any, command: Any) -> None:
    """Register ``peftlab serve`` (called by peftlab.cli)."""
    p = sub.add_parser("serve", description="Serve several runs, exports or merged checkpoints (one base held "
                       "once) over HTTP: POST /v1/{adapter}/predict, GET /v1/adapters, GET /health, docs at /docs. "
                       "Needs the serve extra: pip install 'peftlab[serve]'.")
    p.add_argument("folders", nargs="+", metavar="[NAME=]FOLDER", help="adapters; NAME defaults to the folder's name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=Limits.max_batch, help="inputs per request and per forward pass")
    p.add_argument("--max-length", type=int, default=Limits.max_length, help="characters per input")
    p.add_argument("--max-request-bytes", type=int, default=Limits.max_request_bytes)
    p.add_argument("--batch-wait-ms", type=float, default=Limits.batch_wait_ms,
                   help="how long a request waits for others to share its batch")
    p.add_argument("--shared-pass", action="store_true",
                   help="LoRA adapters on the shared backbone run it once for all their rows of a batch")
    command("serve")(_serve_cmd)


def _serve_cmd(args: Any) -> int:
    for flag in ("max_batch", "max_length", "max_request_bytes", "port"):
        if getattr(args, flag) < 1:
            raise PeftlabError(f"--{flag.replace('_', '-')}: expected a positive number")
    if args.batch_wait_ms < 0:
        raise PeftlabError("--batch-wait-ms: expected 0 or more")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise PeftlabError("peftlab serve needs FastAPI and uvicorn: pip install 'peftlab[serve]'") from None
    from .adapters import load_adapters

    adapters = load_adapters(args.folders, shared_pass=args.shared_pass)  # off: slower here (benchmarks/README)
    for row in adapters.describe():
        log.info("serve: adapter %s (%s, %s) from %s", row["name"], row["task"], row["source"], row["path"])
    log.info("serve: %.1f MiB of weights held once for all adapters; http://%s:%d/docs",
             adapters.shared_bytes / 2**20, args.host, args.port)
    limits = Limits(args.max_batch, args.max_length, args.max_request_bytes, args.batch_wait_ms)
    uvicorn.run(create_app(adapters, limits), host=args.host, port=args.port, log_level="warning")
    return 0
