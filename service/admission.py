"""Admission: the worker's bounded queue as the operations see it — slots taken for a request's life, jobs
submitted with their deadline, and every refusal counted by reason (queue full, deadline, shutting down)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from service.batcher import Job, Worker
from service.errors import ErrorKind, ServiceError
from service.metrics import Metrics


class Admission:
    def __init__(self, worker: Worker, metrics: Metrics) -> None:
        self.worker, self.metrics = worker, metrics

    def arriving(self):
        """Announce a request on its way to the queue (service/batcher.py: a batch waits only for those)."""
        return self.worker.arriving()

    @contextmanager
    def admitted(self, count: int = 1) -> Iterator[None]:
        try:
            with self.worker.admitted(count):
                yield
        except ServiceError as exc:
            if exc.kind is ErrorKind.OVERLOADED:  # slots taken, or too long a wait ahead (service/batcher.py)
                self.metrics.rejected.labels(getattr(exc, "reason", "queue_full")).inc()
            raise

    async def submit(self, job: Job, arrival: Any = None) -> Any:
        try:
            return await self.worker.submit(job, arrival=arrival)
        except ServiceError as exc:
            if exc.kind is ErrorKind.DEADLINE_EXCEEDED:
                self.metrics.rejected.labels("deadline").inc()
            raise
        finally:
            self.metrics.queue_depth.set(self.worker.depth)

    def refuse_draining(self) -> ServiceError:
        self.metrics.rejected.labels("shutting_down").inc()
        return ServiceError(ErrorKind.UNAVAILABLE, "the server is shutting down")
