"""AsyncEngine: an LLMEngine driven by its own thread, used from an asyncio event loop.

Contracts:

- Threads: every LLMEngine call runs on the engine thread ("loraplex-engine"). The event loop
  only enqueues commands (`_commands`, a thread-safe queue) and awaits their futures; outputs come
  back through `loop.call_soon_threadsafe`. Nothing here blocks the event loop.
- Admission: at most `max_pending` requests are in flight (queued or running); one more raises
  `QueueFull` before anything is queued. The count is kept on the event
  loop's thread only.
- Streams: `generate` yields cumulative RequestOutputs (text so far, finished on the last one).
  When the consumer stops early (a client disconnecting cancels it), the request is aborted and
  its KV blocks and adapter slot are freed on the engine thread.
- Failures: an exception inside `LLMEngine.step` (a bug) fails every in-flight request with
  `EngineFailure`; the thread keeps serving new requests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from loraplex import errors
from loraplex.adapters.cache import LocalSource, RemoteSource
from loraplex.config import DEFAULT_MAX_PENDING
from loraplex.core import RequestOutput, SamplingParams
from loraplex.engine.engine import EngineStats, LLMEngine

log = logging.getLogger(__name__)
_T = TypeVar("_T")
Deliver = Callable[[RequestOutput | BaseException], None]


class QueueFull(errors.CapacityExhausted):
    """Too many requests in flight; the caller may retry later."""


class EngineFailure(errors.Unavailable):
    """The engine failed while running this request (not the request's fault)."""


class AdapterForgotten(errors.FinetuneNotFound):
    """The adapter was forgotten (its finetune deleted): it is never registered or used again."""

    def __init__(self, name: str):
        super().__init__("finetune not found: it was deleted")
        self.name = name


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_pending: int = DEFAULT_MAX_PENDING):
        self.engine = engine
        self.max_pending = max_pending
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._deliver: dict[str, Deliver] = {}  # engine thread only
        self._in_flight = 0  # event-loop thread only
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._stats = engine.stats()
        self._forgotten: set[str] = set()  # engine thread only: names never to be registered again
        self._doomed: set[str] = set()  # engine thread only: forgotten but still used by requests
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the thread after its current step; requests still in flight are failed."""
        self._stopping.set()
        self._commands.put((lambda: None, Future()))  # wake it up
        self._thread.join()
        self.engine.close()  # its adapter download folder goes with it

    # -- event-loop side ---------------------------------------------------------------------

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def stats(self) -> EngineStats:
        """The snapshot the engine thread published after its latest step (any thread)."""
        return self._stats

    async def call(self, fn: Callable[[LLMEngine], _T]) -> _T:
        """Run fn(engine) on the engine thread and return its result (or raise its exception)."""
        future: Future = Future()
        self._commands.put((lambda: fn(self.engine), future))
        return await asyncio.wrap_future(future)

    async def ensure_lora(self, name: str, source: LocalSource | RemoteSource) -> None:
        """Register a remote or local adapter under `name` unless it already is; it is fetched on
        first use, off the engine step."""

        def register(engine: LLMEngine) -> None:
            if name in self._forgotten:
                raise AdapterForgotten(name)
            if name not in engine.adapters.names:
                engine.register_lora(name, source)

        await self.call(register)

    async def forget_lora(self, name: str) -> bool:
        """Forget `name` for good (names must not be reused: finetune ids are uuids): it is never
        registered again, new requests for it raise AdapterForgotten, and it is unregistered (slot,
        host and disk copies dropped) now, or once the unfinished requests using it end (they
        run to completion). Returns whether it was unregistered at once."""

        def remove(engine: LLMEngine) -> bool:
            self._forgotten.add(name)
            if name not in engine.adapters.names:
                return False
            if engine.lora_in_use(name):
                self._doomed.add(name)
                return False
            engine.remove_lora(name)
            return True

        return await self.call(remove)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, lora: str | None = None, cache_salt: str = ""
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its cumulative outputs, the last one `finished`. Raises
        QueueFull or ValueError (a request that can never run) before yielding anything.
        cache_salt: see LLMEngine.add_request."""
        if self._in_flight >= self.max_pending:
            raise QueueFull(f"too many requests in flight ({self.max_pending}); retry later")
        self._in_flight += 1
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        request_id = f"req-{next(self._ids)}"
        finished = False

        def deliver(item: RequestOutput | BaseException) -> None:  # engine thread
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        def add(engine: LLMEngine) -> None:
            if lora is not None and lora in self._forgotten:
                raise AdapterForgotten(lora)
            engine.add_request(request_id, prompt_token_ids, params, lora, cache_salt)
            self._deliver[request_id] = deliver

        try:
            await self.call(add)
            while not finished:
                item = await outputs.get()
                while not outputs.empty() and not isinstance(item, BaseException):
                    item = outputs.get_nowait()  # outputs are cumulative: only the latest matters
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._in_flight -= 1
            if not finished:
                self._commands.put((lambda: self._abort(request_id), Future()))

    # -- engine thread -----------------------------------------------------------------------

    def _abort(self, request_id: str) -> None:
        self._deliver.pop(request_id, None)
        self.engine.abort(request_id)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._run_commands(block=not self.engine.has_unfinished())
            if self._stopping.is_set():
                break
            if self.engine.has_unfinished():
                self._step()
            self._remove_doomed()
            self._stats = self.engine.stats()
        self._fail_all(EngineFailure("the server is shutting down"))

    def _run_commands(self, block: bool) -> None:
        try:
            command, future = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(command())
                except BaseException as e:  # handed to the awaiting coroutine
                    future.set_exception(e)
            try:
                command, future = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the requests in flight")
            self._fail_all(EngineFailure(f"internal error while generating: {type(e).__name__}"))
            return
        for out in outputs:
            deliver = self._deliver.get(out.request_id)
            if deliver is None:
                continue
            if out.finished:
                del self._deliver[out.request_id]
            deliver(out)

    def _remove_doomed(self) -> None:
        """Unregister the forgotten adapters whose last requests have ended."""
        for name in [n for n in self._doomed if not self.engine.lora_in_use(n)]:
            self._doomed.discard(name)
            if name in self.engine.adapters.names:
                self.engine.remove_lora(name)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, deliver in list(self._deliver.items()):
            self.engine.abort(request_id)
            deliver(error)
        self._deliver.clear()
