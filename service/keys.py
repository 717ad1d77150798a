"""Keeping the API keys current while serving: the keys file re-read when it changes (polled) and on SIGHUP; a file
that fails to parse keeps the previous keys, and every re-read is counted."""

from __future__ import annotations

import asyncio
import logging

from monosemantic.errors import ConfigError
from service.access import AccessControl
from service.blocking_io import BlockingIO
from service.errors import ServiceError
from service.metrics import Metrics

log = logging.getLogger("monosemantic.serve")


class KeyFileWatcher:
    def __init__(self, access: AccessControl, metrics: Metrics, io: BlockingIO, poll_s: float) -> None:
        self.access, self.metrics, self.io, self.poll_s = access, metrics, io, poll_s

    async def watch(self) -> None:
        """Re-read the keys file whenever it changes, for as long as the server runs (a task of the server's)."""
        while self.access.keys_file is not None:
            await asyncio.sleep(self.poll_s)
            if self.access.file_changed():
                await self.reload()

    async def reload(self) -> None:
        """The keys file, read again and swapped in; a bad file keeps the old keys."""
        if self.access.keys_file is None:
            log.warning("SIGHUP: MONOSEMANTIC_API_KEYS_FILE is not set; nothing to re-read")
            return
        try:
            count = await self.io.run(self.access.reload, "MONOSEMANTIC_API_KEYS_FILE")
        except (ConfigError, ServiceError) as exc:
            self.metrics.key_reloads.labels("failure").inc()
            log.warning("keys file not reloaded, the previous keys stay in use: %s", exc)
            return
        self.metrics.key_reloads.labels("success").inc()
        self.metrics.keys_loaded.set_to_current_time()
        log.info("keys file re-read: %d keys in use", count)
