"""Blocking file-system work (reading the registry) off the event loop, with a deadline a hung read cannot outlive.

A read of a FIFO, or of a hung network file system, never returns and cannot be interrupted. Run in
asyncio.to_thread it held the reload lock for ever (every later reload hung behind it), and the default executor's
threads are joined at exit, so SIGTERM could not stop the process. Here each call gets a daemon thread of its own:
the caller is answered at the deadline, and a stuck thread holds neither a lock nor the process's exit. Stuck
threads are bounded: past MAX_STUCK still running, new calls are refused at once instead of piling up.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, TypeVar

from service.errors import ErrorKind, ServiceError

T = TypeVar("T")
MAX_STUCK = 4


class BlockingIO:
    def __init__(self, timeout_s: float, setting: str) -> None:
        self.timeout_s = timeout_s
        self.setting = setting  # named in the error
        self._lock = threading.Lock()
        self._running = 0  # threads started and not finished, stuck ones included

    @property
    def running(self) -> int:
        return self._running

    async def run(self, fn: Callable[[], T], what: str) -> T:
        """fn() on its own daemon thread; DEADLINE_EXCEEDED naming `what` and the setting when it takes longer."""
        with self._lock:
            if self._running >= MAX_STUCK:
                raise ServiceError(ErrorKind.UNAVAILABLE, f"{what}: {self._running} earlier reads of the registry have not returned (a hung file system?); retry later")
            self._running += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        # A late failure nobody waits for any more is still "retrieved": asyncio would log it as lost otherwise.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

        def deliver(result: object, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def work() -> None:
            result, error = None, None
            try:
                result = fn()
            except BaseException as exc:  # delivered to the caller, who maps it
                error = exc
            finally:
                with self._lock:
                    self._running -= 1
            try:
                loop.call_soon_threadsafe(deliver, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        threading.Thread(target=work, name="monosemantic-registry-io", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except asyncio.TimeoutError:
            raise ServiceError(
                ErrorKind.DEADLINE_EXCEEDED,
                f"{what}: reading the registry did not finish within {self.timeout_s:g} s (setting {self.setting}); nothing was changed",
            ) from None
