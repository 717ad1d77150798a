"""Generation in the service as continuous batching: every running stream's next token comes from one job on the
worker, one forward for all of them (monosemantic/decode_batch.py), with new prompts prefilled and joining and
finished, failed, late or abandoned streams leaving at each step.

One decode job is queued at a time, and the worker queues the next itself at the end of each (no round trip
through the event loop between steps), so a cheap request (activations, attributions) that arrives while streams
run waits for at most the step in progress, not behind one job per stream; and the queue's predicted wait (the
admission bound, service/batcher.py) counts that one step, not every stream's. A stream holds its admission slot
for its whole life (the caller's `admitted`); the steps themselves take none.

Steps are not held back for a slow reader: a row's tokens wait in its queue (at most max_new_tokens of them), as
vLLM's and TGI's do, so one slow client never stalls the batch; a client that leaves frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import AsyncIterator, Callable

from monosemantic.decode_batch import DecodeBatch, Forwarded
from monosemantic.generation import Generation, StepResult
from service.batcher import Job, Worker
from service.errors import ErrorKind, ServiceError


class _Row:
    """A stream's generation and the queue its steps (or the error that ends it) are delivered to."""

    __slots__ = ("generation", "deadline", "queue", "loop", "abandoned")

    def __init__(self, generation: Generation, deadline: float | None) -> None:
        self.generation, self.deadline = generation, deadline
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.abandoned = False  # the caller stopped reading (cancelled, disconnected)


def _put_all(items: list[tuple[_Row, StepResult | BaseException]]) -> None:
    for row, item in items:
        row.queue.put_nowait(item)


class Decoder:
    """The service's running generations, stepped together on the worker."""

    def __init__(self, worker: Worker, max_rows: int, max_tokens: int, on_step: Callable[[int], None] | None = None) -> None:
        self._worker = worker
        self._on_step = on_step  # (rows decoded) of every step that decoded any, for metrics
        # Rows in one forward (MONOSEMANTIC_MAX_BATCH_REQUESTS); more wait to join. 1 turns batching off: then every
        # row steps its own forward, all of them still interleaved step by step (none waits for another to finish).
        self.padded = max_rows > 1
        self.max_rows = max_rows if self.padded else 1 << 30
        self.max_tokens = max_tokens  # a step's tokens (MONOSEMANTIC_MAX_BATCH_TOKENS): its rows plus the prompts prefilled
        self._lock = threading.RLock()  # _joining and _scheduled, between the loop and the worker (re-entered by _fail_all)
        self._joining: deque[_Row] = deque()
        self._scheduled = False  # a decode job is queued or running
        self._rows: dict[int, _Row] = {}  # id(generation) -> row, for the rows in a batch (the worker's alone)
        self._batches: dict[int, DecodeBatch] = {}  # id(model) -> its batch (a reload may bring another model)
        self._outbox: list[tuple[_Row, StepResult | BaseException]] = []  # a step's deliveries (the worker's)
        self._forwarded: dict[int, Forwarded] | None = None  # between a step's halves: each batch's forward

    @property
    def rows(self) -> int:
        """Generations running or waiting to join (read from any thread: a gauge's reading)."""
        return len(self._rows) + len(self._joining)

    async def steps(self, generation: Generation, deadline: float | None) -> AsyncIterator[StepResult]:
        """The generation's steps as the batch makes them, until it is done; raises the error that ended it."""
        row = _Row(generation, deadline)
        with self._lock:
            self._joining.append(row)
            start, self._scheduled = not self._scheduled, True
            if start and not self._worker.enqueue(self._job()):
                self._joining.remove(row)
                self._scheduled = False
                raise ServiceError(ErrorKind.UNAVAILABLE, "the server is shutting down")
        try:
            while True:
                item = await row.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            row.abandoned = True

    def _job(self) -> Job:
        return Job(run=self._step, payload=None, tokens=max(1, len(self._rows)))

    # ---- on the worker thread ------------------------------------------------------------------------------
    def _step(self, jobs: list[Job]) -> list[None]:
        """Half a decode step of every batch: the forward, or (the next job) the sampling and the prompts that
        join; then the next job queued while rows remain. In halves, a cheap request that arrives during a step
        waits for the half in progress, not the whole (the forward is ~60% of a step at 32 rows on the reference)."""
        try:
            if self._forwarded is None:
                self._forwarded = self._forward_all()
                if any(half.seens is not None for half in self._forwarded.values()):
                    return [None]  # (the finally queues the second half)
            forwarded, self._forwarded = self._forwarded, None  # rows stepped alone are whole already: no second job
            self._finish_all(forwarded)
            self._join_waiting()
        except Exception as exc:  # a bug in a step: end every stream with it rather than leave them waiting
            self._forwarded = None
            self._fail_all(exc)
        finally:
            self._next()
        return [None]

    def _next(self) -> None:
        """Queue the next job while rows remain, and hand this one's deliveries over."""
        with self._lock:
            more = bool(self._rows or self._joining)
            if more and not self._worker.enqueue(self._job()):
                self._forwarded = None
                self._fail_all(ServiceError(ErrorKind.UNAVAILABLE, "the server is shutting down"))
                more = False
            self._scheduled = more
        self._send()

    def _fail_all(self, exc: BaseException) -> None:
        rows = list(self._rows.values())
        with self._lock:
            rows.extend(self._joining)
            self._joining.clear()
        self._rows.clear()
        self._batches.clear()
        self._outbox.extend((row, exc) for row in rows)

    def _forward_all(self) -> dict[int, Forwarded]:
        """The first half of a step: finished, late and abandoned rows leave, then every batch's forward."""
        now = time.monotonic()
        forwarded = {}
        for key, batch in list(self._batches.items()):
            gone = {id(g) for g in batch.generations if not self._live(self._rows[id(g)], now)}
            batch.leave(gone)
            for g in gone:
                self._rows.pop(g, None)
            if not len(batch):
                del self._batches[key]
                continue
            if self._on_step is not None:
                self._on_step(len(batch))
            forwarded[key] = batch.forward()
        return forwarded

    def _finish_all(self, forwarded: dict[int, Forwarded]) -> None:
        """The second half: each row's token delivered; rows that finished or failed leave."""
        for key, half in forwarded.items():
            batch = self._batches[key]
            gone = set()
            for outcome in batch.finish(half):
                row = self._rows[id(outcome.generation)]
                self._outbox.append((row, outcome.error if outcome.error is not None else outcome.result))
                if outcome.error is not None or outcome.generation.done:
                    gone.add(id(outcome.generation))
            batch.leave(gone)
            for g in gone:
                self._rows.pop(g, None)
            if not len(batch):
                del self._batches[key]

    def _join_waiting(self) -> None:
        """Prefill the prompts waiting to join, within the step's token budget (at least one when no row runs)."""
        now = time.monotonic()
        budget = self.max_tokens - len(self._rows)
        while len(self._rows) < self.max_rows:
            with self._lock:
                if not self._joining or (budget <= 0 and self._rows):
                    break
                row = self._joining.popleft()
            if not self._live(row, now):
                continue
            budget -= len(row.generation.prompt_ids)
            try:
                first = row.generation.step()  # its prompt alone
            except Exception as exc:
                self._outbox.append((row, exc))
                continue
            self._outbox.append((row, first))
            if not row.generation.done:
                self._batches.setdefault(id(row.generation.model), DecodeBatch(self.padded)).join(row.generation)
                self._rows[id(row.generation)] = row

    def _send(self) -> None:
        """Hand the step's deliveries to their loops, one wake-up per loop (one per row cost 6% of the worker's
        time at 32 rows: each call_soon_threadsafe writes to the loop's self-pipe)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for row, item in self._outbox:
            by_loop.setdefault(row.loop, []).append((row, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is reading
                pass

    def _live(self, row: _Row, now: float) -> bool:
        """Whether the row still steps: not abandoned, its deadline not passed (then it is told so)."""
        if row.abandoned:
            return False
        if row.deadline is not None and now > row.deadline:
            self._outbox.append((row, ServiceError(ErrorKind.DEADLINE_EXCEEDED, "the deadline passed before the generation finished")))
            return False
        return True
