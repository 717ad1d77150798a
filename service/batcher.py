"""The one worker thread that runs every forward, with dynamic batching and a bounded queue.

Hooks live on the shared model object, so forwards must never overlap: all model work goes through this
thread. Jobs with the same batch key (activations on the same loaded dictionary) that are waiting together
are run as one forward, up to max_batch_requests / max_batch_tokens, waiting at most max_wait for company —
so throughput grows with load. The gathering waits only for requests known to be on their way (announced
with `arriving()`), so a lone request never waits at all. Callers live on an asyncio loop;
results come back through loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator

from service.errors import ErrorKind, ServiceError


# After this long with nothing to do, the worker hands the memory its batches freed back to the system. glibc keeps
# freed heap memory for reuse, and its mmap threshold rises after a large block is freed, so after a burst of big
# batches (12 observes of 4 × 20k characters) RSS stayed at 799 MiB against 428 before it; trimmed when idle, it
# returns: 428 → 435 MiB with the encoder's reused buffer dropped too (515 MiB with the trim alone).
# Idle only: trimming between batches would make the next batch page-fault its buffers back in.
IDLE_TRIM_S = 1.0
_LIBC = None


def release_free_memory() -> None:
    """malloc_trim(0) where the C library is glibc; elsewhere nothing."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


@dataclass(eq=False)
class Job:
    run: Callable[[list["Job"]], list[Any]]  # runs a batch of jobs (all with this job's key), one result each
    payload: Any
    batch_key: Hashable | None = None  # None: never batched
    tokens: int = 1
    deadline: float | None = None  # time.monotonic() after which the result is useless
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    abandoned: bool = False  # the caller stopped waiting (cancelled, disconnected)
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class _Arrival:
    queued: bool = False


class Overloaded(ServiceError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            ErrorKind.OVERLOADED,
            f"the server is full ({limit} requests admitted, setting MONOSEMANTIC_MAX_QUEUE); retry shortly",
        )
        self.reason = "queue_full"


class TooLongAWait(ServiceError):
    """Refused because the work already queued would keep this request waiting past the bound: a slow model (a
    Gemma-2-2B on two cores reads ~100 tokens/s) turns even a few dozen queued requests into tens of seconds."""

    def __init__(self, wait_s: float, bound_s: float) -> None:
        super().__init__(
            ErrorKind.OVERLOADED,
            f"the server is busy: about {wait_s:.1f} s of work is queued ahead of this request, over the "
            f"{bound_s:g} s bound (setting MONOSEMANTIC_MAX_QUEUE_WAIT_S); retry later",
        )
        self.reason = "queue_wait"
        self.retry_after_s = max(1, math.ceil(wait_s - bound_s))  # when the queue ahead should be under the bound


def _kind(job: Job) -> Any:
    """What a job's cost is learnt by: the function that runs it (reads, attributions and generation steps differ
    by orders of magnitude per token)."""
    return getattr(job.run, "__func__", job.run)


class Worker:
    """One engine thread over a queue of jobs, batching those that share a key.

    Admission is bounded twice: by requests (`max_queue` slots) and by the wait ahead (`max_queue_wait_s`). The
    wait is predicted from what is queued: each job's tokens times its kind's seconds per token, learnt from the
    batches run (decayed seconds over decayed tokens), plus what is left of the running batch. A request that would wait longer is refused at
    once with a Retry-After, instead of joining a queue it would sit in for the whole client timeout.
    """

    COST_DECAY = 0.7  # a kind's cost is decayed seconds over decayed tokens: big batches weigh by their tokens

    def __init__(
        self,
        max_batch_requests: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[int, int], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        max_queue_wait_s: float = 0.0,
    ) -> None:
        self.max_batch_requests = max_batch_requests
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s  # 0: no bound on the wait
        self._spent: dict[Any, tuple[float, float]] = {}  # a job kind's decayed (seconds, tokens): its cost per token
        self._queued_s = 0.0  # the predicted seconds of the jobs in the queue
        self._running_until = 0.0  # when the running batch should end (time.monotonic())
        self.on_batch = on_batch  # (requests, tokens) of every batch run, for metrics
        self.on_idle = on_idle  # on the worker thread, IDLE_TRIM_S after its last batch: drop buffers it can remake
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._admitted = 0  # requests holding a slot (queued or running)
        self._coming = 0  # requests announced (being validated, tokenized) but not queued yet
        self._worked = False  # batches were run since the worker last gave free memory back
        self._thread = threading.Thread(target=self._loop, name="monosemantic-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def depth(self) -> int:
        return len(self._queue)

    @contextmanager
    def arriving(self) -> Iterator[Job | None]:
        """Announce a request that will submit a batchable job soon, so a batch being gathered waits for it
        (at most max_wait) rather than leaving without it. A lone request never waits: nothing is coming."""
        with self._cond:
            self._coming += 1
        token = _Arrival()
        try:
            yield token
        finally:
            with self._cond:
                if not token.queued:
                    self._coming -= 1

    @contextmanager
    def admitted(self, count: int = 1) -> Iterator[None]:
        """Hold `count` of the max_queue request slots while a request runs (all the steps of a stream);
        refuse at once when they are taken. Counting requests, not jobs, makes the refusals exact: with Q
        slots and N requests arriving together, exactly N − Q are refused, however the steps interleave."""
        with self._cond:
            if self._stopping:
                raise ServiceError(ErrorKind.UNAVAILABLE, "the server is shutting down")
            if self._admitted + count > self.max_queue:
                raise Overloaded(self.max_queue)
            if self.max_queue_wait_s > 0 and (wait := self._wait_ahead()) > self.max_queue_wait_s:
                raise TooLongAWait(wait, self.max_queue_wait_s)
            self._admitted += count
        try:
            yield
        finally:
            with self._cond:
                self._admitted -= count

    def _wait_ahead(self) -> float:
        """Seconds a request admitted now would wait for the work ahead of it (under the lock)."""
        return self._queued_s + max(0.0, self._running_until - time.monotonic())

    def _predicted_s(self, job: Job) -> float:
        seconds, tokens = self._spent.get(_kind(job), (0.0, 1.0))  # an unknown kind: nothing predicted
        return job.tokens * seconds / tokens

    @property
    def wait_ahead_s(self) -> float:
        with self._cond:
            return self._wait_ahead()

    async def submit(self, job: Job, arrival: "_Arrival | None" = None) -> Any:
        """Queue a job and wait for its result (the request it belongs to was admitted with `admitted`)."""
        loop = asyncio.get_running_loop()
        job.loop, job.future = loop, loop.create_future()
        with self._cond:
            if self._stopping:
                raise ServiceError(ErrorKind.UNAVAILABLE, "the server is shutting down")
            self._append(job)
            if arrival is not None and not arrival.queued:
                arrival.queued = True
                self._coming -= 1
        try:
            return await job.future
        except asyncio.CancelledError:
            # The caller left (a client gone, a deadline passed): the worker drops the job when it reaches it.
            # (Taking it out of the deque here, under the worker's lock, measured worse: after a burst of
            # cancellations the p99 at 32 clients stayed at 0.25-0.35 s against 0.09-0.10 s.)
            job.abandoned = True
            raise

    def enqueue(self, job: Job) -> bool:
        """Queue a job nobody awaits, from any thread (the decoder queues its next step from the worker itself, so
        a step follows a step without a round trip through the event loop); False when the worker is stopping."""
        with self._cond:
            if self._stopping:
                return False
            self._append(job)
        return True

    def _append(self, job: Job) -> None:
        """Under the lock."""
        self._queue.append(job)
        self._queued_s += self._predicted_s(job)
        self._cond.notify()

    # ---- the worker thread -------------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                if not self._cond.wait(IDLE_TRIM_S if self._worked else None) and self._worked and not self._queue:
                    self._worked = False
                    if self.on_idle is not None:
                        self.on_idle()
                    release_free_memory()
            self._worked = True
            if self._stopping and not self._queue:
                return None
            first = self._queue.popleft()
            batch = [first]
            if first.batch_key is None or self.max_batch_requests == 1:
                return self._started(batch)
            tokens = first.tokens
            wait_until = first.enqueued + self.max_wait_s
            while len(batch) < self.max_batch_requests:
                match = next((j for j in self._queue if j.batch_key == first.batch_key), None)
                if match is not None:
                    if tokens + match.tokens > self.max_batch_tokens:
                        break
                    self._queue.remove(match)
                    batch.append(match)
                    tokens += match.tokens
                    continue
                remaining = wait_until - time.monotonic()
                if remaining <= 0 or self._stopping or self._coming == 0:
                    break
                self._cond.wait(remaining)
            return self._started(batch)

    def _started(self, batch: list[Job]) -> list[Job]:
        """Move a batch's predicted seconds from the queue to the running batch (under the lock)."""
        predicted = sum(self._predicted_s(job) for job in batch)
        self._queued_s = max(0.0, self._queued_s - predicted) if self._queue else 0.0  # no drift once empty
        self._running_until = time.monotonic() + predicted
        return batch

    def learn(self, batch: list[Job], seconds: float) -> None:
        """Update the batch's kind's seconds per token from how long it took (also a warm-up run off the worker).
        Seconds and tokens are summed with decay, so a lone short request (a fixed overhead over few tokens) does
        not outweigh the batch of two thousand tokens after it."""
        tokens = sum(job.tokens for job in batch)
        if tokens <= 0:
            return
        kind = _kind(batch[0])
        with self._cond:
            spent, counted = self._spent.get(kind, (0.0, 0.0))
            spent, counted = self.COST_DECAY * spent + seconds, self.COST_DECAY * counted + tokens
            self._spent[kind] = (spent, counted)
            self._running_until = 0.0

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for job in batch:
                if job.abandoned:
                    continue
                if job.deadline is not None and now > job.deadline:
                    self._resolve(job, error=ServiceError(ErrorKind.DEADLINE_EXCEEDED, "the deadline passed before the request ran"))
                    continue
                live.append(job)
            if not live:
                with self._cond:
                    self._running_until = 0.0
                continue
            started = time.monotonic()
            try:
                results = live[0].run(live)
            except ServiceError as exc:
                results = [exc] * len(live)
            except Exception as exc:  # never let one bad batch kill the worker; the adapters answer INTERNAL
                results = [exc] * len(live)
            self.learn(live, time.monotonic() - started)
            if self.on_batch is not None:
                self.on_batch(len(live), sum(j.tokens for j in live))
            for job, result in zip(live, results):
                if isinstance(result, BaseException):
                    self._resolve(job, error=result)
                else:
                    self._resolve(job, result=result)

    @staticmethod
    def _resolve(job: Job, result: Any = None, error: BaseException | None = None) -> None:
        if job.future is None:  # enqueued: nobody waits for its result
            return

        def deliver() -> None:
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

        try:
            job.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
