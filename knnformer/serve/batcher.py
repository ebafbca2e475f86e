"""Continuous batching for a CPU model: one worker thread owns the model, its KV caches and the index; the server's
event loop only hands it requests and reads back what each one produced.

Each iteration of the worker: admit waiting requests into free rows of one pooled KV cache (a request's prompt is
run into its row alone, all but its last token), rebuild a row whose window is full, then step every active row's
last token together as one batch (``Transformer`` steps rows at their own positions), sample each row's next
token, retrieve for a row whose text just completed a chunk, and hand each request its new text and, when the
neighbours serving it change, its new citations. A finished or cancelled request frees its row: the last active
row moves into it (``KVCache.copy_row``), so the active rows stay rows 0 .. n - 1 of the pool.

Citations. Generated token j (sequence position j) was predicted from position j - 1, which reads the slot of
chunk j // C - 1 (see model/retro.py): the neighbours retrieved with that chunk served it. Consecutive tokens
served by the same retrieval form one citation group, with the character span of the completion they cover.
"""

from __future__ import annotations

import codecs
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from knnformer.serve.generate import RetrievingGenerator, pick_tokens, rebuilt_window_start

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """One completion: its inputs, the callback that receives its events (called from the worker thread), and
    its state while it runs. Events: {"text": piece, "citations": [new groups]} per token with text or new
    citations, then {"done": finish_reason, "citations": all groups, "usage": ...} or {"error": message}."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[dict], None]
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    retrieval: bool = True
    stop: list[str] = field(default_factory=list)
    channel: object = None  # for the engine's ``deliver``: where this request's events go (the server's queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # set by the worker
    gen: RetrievingGenerator | None = None
    ids: list[int] = field(default_factory=list)
    w0: int = 0
    generated: int = 0
    text: str = ""
    sent: int = 0  # characters of ``text`` already handed out
    groups: list[dict] = field(default_factory=list)
    last_token_at: float = 0.0
    decoder: object = None
    generator: torch.Generator | None = None


class Engine:
    """The worker: ``submit`` from any thread; ``start`` / ``stop`` the thread. ``make_generator(feed)`` gives a
    fresh ``RetrievingGenerator`` (its own retrieval record) for one request; ``citation_sources(gen, chunk)``
    the sources of the neighbours gen retrieved with ``chunk``."""

    def __init__(self, model, tokenizer, make_generator: Callable[[bool], RetrievingGenerator],
                 citation_sources: Callable[[RetrievingGenerator, int], list[dict]], max_batch: int = 16,
                 max_queue: int = 64, metrics=None,
                 deliver: Callable[[list[tuple[Request, dict]]], None] | None = None):
        """``deliver``: hands one iteration's events of all requests over at once (one wake-up of the server's
        event loop per batched step, not one per token and request: on a busy CPU each hand-over between threads
        waits for the scheduler); without it each event goes to its request's ``emit``."""
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.make_generator, self.citation_sources = make_generator, citation_sources
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics
        self.deliver = deliver
        self.outbox: list[tuple[Request, dict]] = []
        self.context = model.config.context
        if model.config.attention != "softmax":
            raise ValueError("the server batches over KV caches: it serves softmax-attention models, "
                             "not model.attention=performer")
        self.pool = make_generator(True).new_cache(max_batch)
        self.pool.length = torch.zeros(max_batch, dtype=torch.long)
        self.chunk_size = make_generator(True).C
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False

    # -- the other threads' side ---------------------------------------------------------------------------------
    def submit(self, request: Request) -> bool:
        """Queue a request; False when the queue is full (the caller answers 429)."""
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                return False
            self.waiting.append(request)
            self.cond.notify()
        return True

    def queue_length(self) -> int:
        return len(self.waiting)

    def busy_rows(self) -> int:
        return len(self.active)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="knnformer-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)

    # -- the worker ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        import faiss

        faiss.omp_set_num_threads(1)  # one query at a time gains nothing from faiss's threads (generate.py)
        while True:
            with self.cond:
                while not self.waiting and not self.active and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    break
            try:
                self._iteration()
            except Exception as e:  # a bug must not kill the worker silently: fail every running request
                logger.exception("engine iteration failed")
                for req in self.active:
                    self._send(req, {"error": f"generation failed: {type(e).__name__}: {e}"})
                self.active = []
                try:
                    self._flush()
                except Exception:  # delivering failed too: those requests' clients time out
                    logger.exception("delivering the engine's errors failed")
                    self.outbox = []
        for req in [*self.active, *self.waiting]:
            req.emit({"error": "the server is shutting down"})

    def _send(self, req: Request, event: dict) -> None:
        self.outbox.append((req, event))

    def _flush(self) -> None:
        out, self.outbox = self.outbox, []
        if self.deliver is not None:
            self.deliver(out)
        else:
            for req, event in out:
                req.emit(event)

    def _iteration(self) -> None:
        try:
            self._step_all()
        finally:
            self._flush()

    @torch.no_grad()
    def _step_all(self) -> None:
        self._admit()
        self._drop_cancelled()
        if not self.active:
            return
        n = len(self.active)
        for row, req in enumerate(self.active):
            if len(req.ids) - req.w0 > self.context:  # its window is full: rebuild the row from the last half
                req.w0 = rebuilt_window_start(len(req.ids), self.context, self.chunk_size)
                self._prefill(row, req)
            if len(req.ids) % self.chunk_size == 0:  # a chunk just completed: its slot is new
                req.gen.fill_slots(self.pool.retrieval, row, len(req.ids), req.w0)
        tokens = torch.tensor([[req.ids[-1]] for req in self.active], dtype=torch.long)
        t0 = time.perf_counter()
        logits, _ = self.model(tokens, cache=self.pool.rows(slice(0, n)))
        if self.metrics is not None:
            self.metrics.observe("batch_step_seconds", time.perf_counter() - t0)
            self.metrics.observe("batch_size", n)
        finished = []
        picked = pick_tokens(logits[:, -1], [req.temperature for req in self.active],
                             [req.top_p for req in self.active], [req.generator for req in self.active])
        for row, (req, next_id) in enumerate(zip(self.active, picked)):
            reason = self._append(req, next_id)
            if reason is not None:
                finished.append((row, reason))
        for row, reason in reversed(finished):
            self._finish(row, reason)

    def _admit(self) -> None:
        while len(self.active) < self.max_batch:
            with self.cond:
                if not self.waiting:
                    return
                req = self.waiting.popleft()
            if req.cancelled.is_set():
                continue
            try:
                self._start(req)
            except ValueError as e:
                self._send(req, {"error": str(e)})

    def _start(self, req: Request) -> None:
        req.gen = self.make_generator(req.retrieval)
        req.ids = list(req.prompt_ids)
        req.generator = torch.Generator()
        req.generator.manual_seed(req.seed) if req.seed is not None else req.generator.seed()
        req.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._prefill(len(self.active), req)  # into the next free row; a ValueError there leaves the row free
        self.active.append(req)
        if self.metrics is not None:
            self.metrics.observe("queue_wait_seconds", time.perf_counter() - req.submitted)

    def _prefill(self, row: int, req: Request) -> None:
        """Run all but the last token of the request's window into pool row ``row`` (the batched step feeds the
        last one), with every retrieval of its text so far."""
        t0 = time.perf_counter()
        for chunk in range(len(req.ids) // self.chunk_size):
            req.gen.retrieve(req.ids, chunk)
        if self.metrics is not None and req.gen.latencies_ms:
            for ms in req.gen.latencies_ms:
                self.metrics.observe("retrieval_seconds", ms / 1000)
            req.gen.latencies_ms.clear()
        view = self.pool.rows(slice(row, row + 1))
        view.length = 0
        head = req.ids[:-1]
        if len(head) > req.w0:
            req.gen.prefill(view, head, req.w0)
        elif view.retrieval is not None:
            view.retrieval.clear(0)
        self.pool.length[row] = len(req.ids) - 1 - req.w0
        if self.metrics is not None:
            self.metrics.observe("prefill_seconds", time.perf_counter() - t0)

    def _append(self, req: Request, next_id: int) -> str | None:
        """Take one sampled token: its text and citations to the client; the finish reason when it ends."""
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.inc("tokens_generated_total")
            if req.generated == 0:
                self.metrics.observe("time_to_first_token_seconds", now - req.submitted)
            else:
                self.metrics.observe("inter_token_seconds", now - req.last_token_at)
        req.last_token_at = now
        req.generated += 1
        eot = self.tokenizer.eot_id
        position = len(req.ids)  # the new token's place in the sequence
        req.ids.append(next_id)
        new_groups = self._cite(req, position)
        piece = "" if next_id == eot else req.decoder.decode(self.tokenizer.id_to_bytes(next_id))
        req.text += piece
        reason = None
        if next_id == eot:
            reason = "stop"
        elif req.generated >= req.max_tokens:
            reason = "length"
        if reason is not None:
            req.text += req.decoder.decode(b"", final=True)
        cut = min((i for i in (req.text.find(s, max(0, req.sent - len(s))) for s in req.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            req.text, reason = req.text[:cut], "stop"
        if req.groups:
            req.groups[-1]["span"][1] = len(req.text)
        # hold back what could be the start of a stop sequence
        hold = 0 if reason else max((len(s) - 1 for s in req.stop), default=0)
        upto = max(req.sent, len(req.text) - hold)
        if upto > req.sent or new_groups:
            self._send(req, {"text": req.text[req.sent : upto], "citations": new_groups})
            req.sent = upto
        if reason is None and len(req.ids) % self.chunk_size == 0:
            req.gen.retrieve(req.ids, len(req.ids) // self.chunk_size - 1)
            if self.metrics is not None:
                for ms in req.gen.latencies_ms:
                    self.metrics.observe("retrieval_seconds", ms / 1000)
                req.gen.latencies_ms.clear()
        return reason

    def _cite(self, req: Request, position: int) -> list[dict]:
        """Start a citation group when the retrieval serving sequence position ``position`` differs from the one
        that served the token before; the new groups."""
        chunk = position // self.chunk_size - 1
        if req.groups and req.groups[-1]["retrieved_with_chunk"] == chunk:
            return []
        if chunk < 0 or chunk not in req.gen.retrieved:
            return []
        C = self.chunk_size
        group = {"retrieved_with_chunk": chunk, "query": self.tokenizer.decode(req.ids[chunk * C : (chunk + 1) * C]),
                 "span": [len(req.text), len(req.text)], "read_by_model": req.gen.feeds,
                 "sources": self.citation_sources(req.gen, chunk)}
        req.groups.append(group)
        return [{**group, "span": [len(req.text), None]}]  # a copy: the span's end is known when the next starts

    def _finish(self, row: int, reason: str) -> None:
        req = self.active[row]
        if req.sent < len(req.text):
            self._send(req, {"text": req.text[req.sent :], "citations": []})
            req.sent = len(req.text)
        for g in req.groups:
            g["span"][1] = min(g["span"][1], len(req.text))
        self._send(req, {"done": reason, "citations": [{**g, "span": list(g["span"])} for g in req.groups],
                  "usage": {"prompt_tokens": len(req.prompt_ids), "completion_tokens": req.generated,
                            "total_tokens": len(req.prompt_ids) + req.generated}})
        self._free(row)

    def _free(self, row: int) -> None:
        last = len(self.active) - 1
        if row != last:
            self.pool.copy_row(last, row)
            self.active[row] = self.active[last]
        self.active.pop()

    def _drop_cancelled(self) -> None:
        for row in reversed(range(len(self.active))):
            if self.active[row].cancelled.is_set():
                if self.metrics is not None:
                    self.metrics.inc("requests_cancelled_total")
                self._free(row)
