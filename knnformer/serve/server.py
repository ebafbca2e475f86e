"""An OpenAI-compatible HTTP server for a run that cites its sources: ``/v1/completions`` (with server-sent-event
streaming as OpenAI clients parse it) returns, beside the text, the neighbours that served each generated chunk
(document, byte span, score, text, and the span of the completion they served); ``/v1/retrieve`` searches the
index; ``/v1/models``, ``/healthz``, ``/metrics`` (Prometheus) and ``/`` (a page that shows the citations).

The event loop never runs the model: requests go to the ``Engine`` worker (batcher.py), which owns the model and
the index and hands back events through a queue per request. A full queue answers 429 with Retry-After; a
client that goes away cancels its generation. Every error a client can cause is a 4xx in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request as HTTPRequest

from knnformer.serve.batcher import Engine, Request
from knnformer.serve.generate import RetrievingGenerator, open_generation_retriever
from knnformer.serve.metrics import Metrics

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20


class CompletionBody(BaseModel):
    """OpenAI's completion request (the fields this server honours; ``n``, ``user`` and ``stream_options`` are
    accepted as OpenAI clients send them), plus ``retrieval``: false generates without the neighbours."""

    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str | list[str] = ""
    model: str | None = None
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    stream_options: dict | None = None
    retrieval: bool = True


class RetrieveBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str = Field(min_length=1)
    k: int = Field(4, ge=1, le=32)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


class LockedRetriever:
    """The run's retriever, one search at a time: the engine's worker and ``/v1/retrieve`` share it."""

    def __init__(self, inner):
        self.inner, self.lock = inner, threading.Lock()

    def neighbours(self, texts, k, pad_id=0):
        with self.lock:
            return self.inner.neighbours(texts, k, pad_id)

    def search(self, texts, k):
        with self.lock:
            return self.inner.search(texts, k)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@dataclass
class Service:
    """What the app serves: the run's model, datastore, retriever and engine, and its description."""

    name: str
    model: Any
    store: Any
    retriever: Any
    engine: Engine
    metrics: Metrics
    info: dict
    max_tokens: int = 1024

    def close(self) -> None:
        self.engine.stop()


def run_info(run_dir: Path, model, record: dict, store, k: int) -> dict:
    """The page's header: the run's name, size, settings and its last evaluation in metrics.jsonl."""
    from knnformer.run.record import run_retrieval

    cfg, rcfg = record["config"]["model"], run_retrieval(record)
    last_eval, last_step = {}, None
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            last_step = row.get("step", last_step)
            if "valid_loss" in row:
                last_eval = {"step": row.get("step"), "valid_loss": row["valid_loss"],
                             "valid_bits_per_byte": row.get("valid_bpb")}
    return {"run": run_dir.name, "parameters": model.num_params(), "layers": cfg["num_layers"], "dim": cfg["dim"],
            "context": cfg["context"], "vocab_size": cfg["vocab_size"], "tokenizer": store.tokenizer.kind,
            "retrieval": rcfg.enabled, "chunk_size": rcfg.chunk_size, "neighbours": k,
            "embedder": rcfg.search.embedder, "trained_steps": last_step, "evaluation": last_eval}


def deliver_events(batch: list[tuple[Request, dict]]) -> None:
    """One batched step's events, handed to each event loop in one call (runs on the engine's thread)."""
    by_loop: dict = {}
    for req, event in batch:
        if req.channel is None:  # a request made outside the HTTP app (a benchmark): its own callback
            req.emit(event)
            continue
        loop, queue = req.channel
        by_loop.setdefault(loop, []).append((queue, event))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(put_all, items)
        except RuntimeError:  # that loop is gone (shutdown)
            pass


def put_all(items: list) -> None:
    for queue, event in items:
        queue.put_nowait(event)


def fast_bm25(retriever) -> None:
    """A bm25 index searches with bm25s's numba backend, compiled here once (a few seconds) rather than on the
    first request: ~10x faster per live query than numpy's (see ``BM25Index.backend``), with the same scores and
    the tie order the precomputed training neighbours were searched with (large batches use numba too)."""
    index = getattr(retriever, "index", None)
    if getattr(index, "kind", None) != "bm25":
        return
    try:
        import numba  # noqa: F401
    except ImportError:
        return
    index.backend = "numba"
    retriever.search(["warm up"], 1)


def open_service(run_dir: str | Path, datastore: str | None = None, max_batch: int = 16, max_queue: int = 64,
                 max_tokens: int = 1024, databases: list[str] | None = None) -> Service:
    """Load a run, open its index once and start the engine. ``databases``: retrieval databases to retrieve from
    and cite instead of the datastore (``retrieval/database.py``; default: those the run trained against, if any);
    a RETRO run reads them through its cross-attention, a plain LM cites them."""
    from knnformer.run.record import load_run, open_run_datastore, run_retrieval

    run_dir = Path(run_dir)
    model, record, _ = load_run(run_dir)
    store = open_run_datastore(record, datastore)
    rcfg = run_retrieval(record)
    databases = databases or (rcfg.search.databases.split(",") if rcfg.enabled and rcfg.search.databases else None)
    if databases:
        from knnformer.retrieval.database import open_databases

        retriever, frozen = open_databases(databases, store.manifest["tokenizer"]["fingerprint"],
                                           rcfg.chunk_size if rcfg.enabled else None, f"run {run_dir}"), None
    else:
        try:
            retriever, frozen = open_generation_retriever(model, store, run_dir, record, feed=rcfg.enabled)
        except ValueError as e:
            raise ValueError(f"serving cites the datastore's chunks, so it needs an index: {e}") from None
    fast_bm25(retriever)
    retriever = LockedRetriever(retriever)
    k = (rcfg.eval_neighbours or rcfg.num_neighbours) if rcfg.enabled else 2

    def make_generator(feed: bool) -> RetrievingGenerator:
        return RetrievingGenerator(model, retriever, k, rcfg.continuation, feed_model=rcfg.enabled and feed,
                                   frozen=frozen if feed else None)

    # a chunk's provenance never changes: the engine looks each one up once (it cites a few per 16 tokens and row)
    source = functools.lru_cache(maxsize=1 << 16)(retriever.source)

    def citation_sources(gen: RetrievingGenerator, chunk: int) -> list[dict]:
        nb, out = gen.retrieved[chunk], []
        for j in range(gen.k):
            cid = int(nb.ids[0, j])
            if cid < 0:
                continue
            src = source(cid)  # document, offsets, text (and database, for a retrieval database); read only
            C = gen.C
            after = nb.tokens[0, j, C:][nb.mask[0, j, C:]] if rcfg.continuation else []
            out.append({"doc_id": src["doc_id"], "chunk_id": cid, "split": src["split"],
                        **({"database": src["database"]} if "database" in src else {}),
                        "byte_span": [src["byte_offset"], src["byte_offset"] + len(src["text"].encode("utf-8"))],
                        "score": float(nb.scores[0, j]), "text": src["text"],
                        # the chunk after it, which the model reads too (RETRO's continuation)
                        "continuation": store.tokenizer.decode(after.tolist()) if len(after) else ""})
        return out

    metrics = Metrics()
    engine = Engine(model, store.tokenizer, make_generator, citation_sources, max_batch, max_queue, metrics,
                    deliver_events)
    metrics.gauge("queue_length", engine.queue_length)
    metrics.gauge("active_rows", engine.busy_rows)
    engine.start()
    return Service(run_dir.name, model, store, retriever, engine, metrics, run_info(run_dir, model, record, store, k),
                   max_tokens)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


async def read_json(request: HTTPRequest) -> Any:
    """The request's JSON body, at most MAX_BODY_BYTES; a 4xx for anything else."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None


def validate(model: type[BaseModel], data: Any) -> BaseModel:
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise ApiError(400, f"{param}: {message}" if param else message, param=param) from None


def create_app(service: Service):
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="knnformer", docs_url=None, redoc_url=None, openapi_url=None)
    context = service.model.config.context
    tokenizer = service.store.tokenizer

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        service.metrics.inc("requests_total", path=request.url.path, status=exc.status)
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        service.metrics.inc("requests_total", path="other", status=exc.status_code)
        return JSONResponse(error_body(str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # a bug: logged here, never a stack trace to the client
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal error", "server_error"), 500)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def healthz():
        alive = service.engine.thread is not None and service.engine.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, 200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "knnformer"}]}

    @app.get("/v1/info")
    async def info():
        return service.info

    @app.post("/v1/chat/completions")
    async def chat():
        raise ApiError(400, f"{service.name} is a base language model (trained on plain text, no chat template): "
                            "use /v1/completions with a prompt")

    @app.post("/v1/retrieve")
    async def retrieve(request: HTTPRequest):
        body = validate(RetrieveBody, await read_json(request))
        from starlette.concurrency import run_in_threadpool

        def search():
            t0 = time.perf_counter()
            D, I = service.retriever.search([body.text], body.k)
            ms = 1000 * (time.perf_counter() - t0)
            service.metrics.observe("retrieval_seconds", ms / 1000)
            out = []
            for rank, (score, cid) in enumerate(zip(D[0].tolist(), I[0].tolist())):
                if cid < 0:
                    continue
                src = service.retriever.source(cid)
                out.append({"rank": rank, "score": score, "doc_id": src["doc_id"], "chunk_id": cid,
                            "split": src["split"], **({"database": src["database"]} if "database" in src else {}),
                            "byte_span": [src["byte_offset"],
                                          src["byte_offset"] + len(src["text"].encode("utf-8"))],
                            "text": src["text"]})
            return {"object": "list", "data": out, "latency_ms": ms}

        result = await run_in_threadpool(search)
        service.metrics.inc("requests_total", path="/v1/retrieve", status=200)
        return result

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = validate(CompletionBody, await read_json(request))
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: give one prompt per request", param="prompt")
            prompt = prompt[0]
        if body.max_tokens > service.max_tokens:
            raise ApiError(400, f"max_tokens: at most {service.max_tokens}", param="max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: up to 4 non-empty strings", param="stop")
        ids = tokenizer.encode(prompt)
        if not ids:
            ids = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n")
        dropped = max(0, len(ids) - context)
        ids = ids[dropped:]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: dict) -> None:  # called from the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        req = Request(ids, body.max_tokens, emit, body.temperature, body.top_p, body.seed, body.retrieval, stops,
                      channel=(loop, events))
        if not service.engine.submit(req):
            service.metrics.inc("requests_rejected_total")
            raise ApiError(429, f"the server is busy ({service.engine.max_queue} requests waiting); retry shortly",
                           "rate_limit_error", headers={"Retry-After": "1"})
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        extra = {"retrieval": body.retrieval and bool(service.info["retrieval"]),
                 "prompt_tokens_dropped": dropped}
        if dropped:
            extra["warning"] = (f"the prompt was {len(ids) + dropped} tokens; its first {dropped} were cut to fit "
                                f"the model's context of {context}")

        def chunk(text: str, finish: str | None, citations: list | None, more: dict | None = None) -> dict:
            out = {"id": rid, "object": "text_completion", "created": created, "model": service.name,
                   "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
            if citations:
                out["citations"] = citations
            return {**out, **(more or {})}

        if body.stream:
            async def sse():
                first = True
                try:
                    while True:
                        ev = await events.get()
                        if "error" in ev:
                            yield f"data: {json.dumps(error_body(ev['error'], 'server_error'))}\n\n"
                            return
                        more = extra if first else None
                        first = False
                        if "done" in ev:
                            last = chunk("", ev["done"], ev["citations"], {**(more or {}), "usage": ev["usage"]})
                            yield f"data: {json.dumps(last)}\n\n"
                            yield "data: [DONE]\n\n"
                            service.metrics.inc("requests_total", path="/v1/completions", status=200)
                            return
                        yield f"data: {json.dumps(chunk(ev['text'], None, ev['citations'], more))}\n\n"
                finally:
                    req.cancelled.set()  # the client went away (or we are done): the engine drops the row

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def watch_disconnect():  # a client that leaves cancels its generation
            while not req.cancelled.is_set():
                if await request.is_disconnected():
                    req.cancelled.set()
                    events.put_nowait({"error": "client closed the request", "gone": True})
                    return
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch_disconnect())
        text = []
        try:
            while True:
                ev = await events.get()
                if ev.get("gone"):
                    return JSONResponse(error_body("client closed the request"), 499)
                if "error" in ev:
                    raise ApiError(500, ev["error"], "server_error")
                if "done" in ev:
                    break
                text.append(ev["text"])
        finally:
            req.cancelled.set()
            watcher.cancel()
        service.metrics.inc("requests_total", path="/v1/completions", status=200)
        return {**chunk("".join(text), ev["done"], ev["citations"]), "citations": ev["citations"],
                "usage": ev["usage"], **extra}

    return app
