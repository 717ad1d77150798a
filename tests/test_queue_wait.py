"""Admission by the wait ahead (service/batcher.py): a request the queued work would keep waiting past
MONOSEMANTIC_MAX_QUEUE_WAIT_S is refused at once, with how long to wait; the bound learns each kind of job's cost."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.batcher import Job, TooLongAWait, Worker


def sleeping(seconds_per_token: float):
    def run(jobs: list[Job]) -> list[int]:
        time.sleep(seconds_per_token * sum(job.tokens for job in jobs))
        return [job.tokens for job in jobs]
    return run


def worker(bound_s: float) -> Worker:
    w = Worker(max_batch_requests=1, max_batch_tokens=10_000, max_wait_s=0.0, max_queue=100, max_queue_wait_s=bound_s)
    w.start()
    return w


async def admitted_run(w: Worker, run, tokens: int) -> int:
    with w.admitted():
        return await w.submit(Job(run=run, payload=None, batch_key=None, tokens=tokens))


def test_a_request_behind_too_much_queued_work_is_refused_at_once_with_its_retry_after():
    slow = sleeping(0.05)

    async def scenario():
        w = worker(bound_s=0.3)
        try:
            await admitted_run(w, slow, 2)  # learns 0.05 s a token
            ahead = asyncio.ensure_future(admitted_run(w, slow, 30))  # 1.5 s of work: admitted, nothing was ahead
            await asyncio.sleep(0.05)
            started = time.monotonic()
            with pytest.raises(TooLongAWait) as refused:
                with w.admitted():
                    pass
            refused_in = time.monotonic() - started
            assert await ahead == 30  # the admitted one still runs
            return refused.value, refused_in
        finally:
            w.stop()

    error, refused_in = asyncio.run(scenario())
    assert refused_in < 0.05
    assert error.reason == "queue_wait" and "MONOSEMANTIC_MAX_QUEUE_WAIT_S" in error.message
    assert error.retry_after_s == 2  # ~1.45 s ahead, 0.3 s allowed: retry in about 1.15 s, rounded up


def test_an_idle_worker_admits_any_request_and_an_unknown_kind_is_never_refused_for_its_wait():
    async def scenario():
        w = worker(bound_s=0.1)
        try:
            # the first job of a kind has no cost yet: what is queued behind it is not refused
            first = [asyncio.ensure_future(admitted_run(w, sleeping(0.01), 40)) for _ in range(3)]
            await asyncio.sleep(0.02)
            with w.admitted():
                pass
            await asyncio.gather(*first)
            assert w.wait_ahead_s == 0.0  # nothing queued or running
            return await admitted_run(w, sleeping(0.01), 500)  # alone: admitted whatever it costs itself
        finally:
            w.stop()

    assert asyncio.run(scenario()) == 500


def test_no_bound_admits_up_to_the_slots_however_long_the_wait():
    async def scenario():
        w = worker(bound_s=0.0)
        try:
            await admitted_run(w, sleeping(0.05), 2)
            ahead = asyncio.ensure_future(admitted_run(w, sleeping(0.05), 20))
            await asyncio.sleep(0.02)
            with w.admitted():
                pass
            await ahead
        finally:
            w.stop()

    asyncio.run(scenario())
