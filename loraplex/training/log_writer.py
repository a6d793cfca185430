"""LogWriter: stores request-log records off the request path, in one background thread.

Contract:
- `submit(record)` never blocks and never raises: the record joins a bounded queue
  (`RequestLogConfig.max_queued`); when the queue is full the record is dropped and
  `on_drop("queue_full")` is called. Safe from any thread (the event loop included).
- The writer thread stores each record (`LogStore.add`). A record the store refuses as too large
  is dropped with `on_drop("too_large")`; any other store failure is logged (one warning line,
  no record content) and dropped with `on_drop("store_error")`; the thread goes on.
  `on_written()` counts the stored ones.
- Every `sweep_interval_s` (and once at start) the thread deletes expired entries of every account
  (`LogStore.sweep`).
- `drain()` waits until every record submitted so far has been handled (for tests and shutdown);
  `stop()` drains, then ends the thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from loraplex.errors import TooLarge
from loraplex.training.logs import LogRecord, LogStore

log = logging.getLogger(__name__)
_STOP = object()


class LogWriter:
    def __init__(self, store: LogStore, on_drop: Callable[[str], None] = lambda reason: None,
                 on_written: Callable[[], None] = lambda: None):
        self.store, self.on_drop, self.on_written = store, on_drop, on_written
        self._queue: queue.Queue = queue.Queue(maxsize=store.config.max_queued)
        self._thread = threading.Thread(target=self._loop, name="loraplex-request-logs", daemon=True)
        self._next_sweep = 0.0

    def start(self) -> None:
        self._thread.start()

    def submit(self, record: LogRecord) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.on_drop("queue_full")

    def drain(self) -> None:
        self._queue.join()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            self._maybe_sweep()
            try:
                item = self._queue.get(timeout=self.store.config.sweep_interval_s)
            except queue.Empty:
                continue
            try:
                if item is _STOP:
                    return
                self._write(item)
            finally:
                self._queue.task_done()

    def _write(self, record: LogRecord) -> None:
        try:
            self.store.add(record)
        except TooLarge:
            self.on_drop("too_large")
        except Exception as e:
            log.warning("request log not stored: %s", type(e).__name__)
            self.on_drop("store_error")
        else:
            self.on_written()

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.store.config.sweep_interval_s
        try:
            self.store.sweep()
        except Exception as e:
            log.warning("request log sweep failed: %s", type(e).__name__)
