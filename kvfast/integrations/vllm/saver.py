"""Publishing prompts' KV off the engine's step: one background thread gathers each prompt from the engine's blocks
and puts it into the store, while vLLM holds the blocks (its asynchronous-save protocol).

The protocol, as vLLM 0.32 runs it (``KVConnectorBase_V1``): the scheduler side answers ``request_finished`` with
True for a request whose save it scheduled, so vLLM keeps the request's blocks; the worker side names the request
in ``get_finished``'s "finished sending" set once vLLM has told it the request finished *and* its save is over,
and vLLM frees the blocks then. Until then nothing writes those blocks, with one exception: a preempted request's
blocks are freed at once, so the worker waits for such a save's gather before the step that may reuse them
(:meth:`BackgroundSaver.wait_gathered`).

Durability and atomicity are the store's (``Store.put``: written to a temporary file,
fsynced, renamed): a process killed mid-save leaves no entry. A save that fails is logged and counted, and never
fails its request.
"""
from __future__ import annotations

import logging
import threading
import time
import queue
from concurrent.futures import Future
from dataclasses import dataclass, field

from kvfast.cache.pages import KVPages
from kvfast.errors import KVLayoutError
from kvfast.integrations.vllm.common import DECLINE
from kvfast.store import Store

logger = logging.getLogger("vllm.kvfast.integrations.vllm")


@dataclass
class _Save:
    gathered: threading.Event = field(default_factory=threading.Event)  # the blocks may be reused from then on
    done: Future = field(default_factory=Future)  # result: the document key, or "failed: why"


class BackgroundSaver:
    """Saves of prompts' KV from ``pages`` into ``store``, one at a time on a background thread.

    Args:
        store: where prompts are published.

    Attributes:
        pages: the engine's KV pages, read only while a saved request's blocks are held; None while vLLM's caches
            are not registered (or were refused): then each save fails at once, and is still reported finished.
        refused: why there are no pages (for the failed saves' message).

    Example:
        >>> saver = BackgroundSaver(store); saver.pages = pages                      # doctest: +SKIP
        >>> saver.submit("req-1", prompt_ids, block_ids, fingerprint)               # doctest: +SKIP
        >>> saver.finished({"req-1"})      # vLLM says req-1 finished: reported once its save is over
        set()
    """

    def __init__(self, store: Store):
        self._store = store
        self.pages: KVPages | None = None
        self.refused = "vLLM's KV caches were never registered"
        # A daemon thread: an engine shutting down does not wait for queued saves (each is atomic: a save cut
        # short leaves no entry).
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="kvfast-save", daemon=True).start()
        self._saves: dict[str, _Save] = {}  # req id -> save, until reported finished
        self._finished: set[str] = set()  # req ids vLLM finished whose save is not reported yet
        self._outcomes: dict[str, str] = {}  # req id -> document key or "failed: ...", not yet reported
        self._lock = threading.Lock()  # _outcomes is written by the save thread
        self.failures = 0

    def submit(self, req_id: str, token_ids: list[int], block_ids: list[int], fingerprint: str) -> None:
        """Start publishing a request's prompt (its ``token_ids`` in ``block_ids``); returns at once."""
        save = _Save()
        self._saves[req_id] = save
        self._queue.put((req_id, save, token_ids, block_ids, fingerprint))

    def _loop(self) -> None:
        while (work := self._queue.get()) is not None:
            work[1].done.set_result(self._run(*work))

    def _run(self, req_id: str, save: _Save, token_ids: list[int], block_ids: list[int], fingerprint: str) -> str:
        t0 = time.perf_counter()
        try:
            try:
                pages, n = self.pages, len(token_ids)
                if pages is None:
                    raise KVLayoutError(self.refused)
                keys, values = zip(*(pages.gather(layer, block_ids, n) for layer in range(pages.num_layers)))
            finally:
                save.gathered.set()
            entry = self._store.put((list(keys), list(values)), token_ids=token_ids, fingerprint=fingerprint)
            outcome = entry.key.document
            logger.info("kvfast: request %s: prompt KV published in the background (%d tokens, %.3f s): %s", req_id,
                        n, time.perf_counter() - t0, entry.path)
        except Exception as exc:  # noqa: BLE001 - a failed save is logged and counted, never raised into the engine
            logger.warning("kvfast: request %s: publishing its prompt KV failed: %s", req_id, exc,
                           exc_info=not isinstance(exc, DECLINE))
            with self._lock:
                self.failures += 1
            outcome = f"failed: {exc}"
        with self._lock:
            self._outcomes[req_id] = outcome
        return outcome

    def wait_gathered(self, req_ids: set[str]) -> None:
        """Block until the saves of ``req_ids`` (preempted requests: vLLM frees their blocks now) read their blocks."""
        for req_id in req_ids & self._saves.keys():
            self._saves[req_id].gathered.wait()

    def finished(self, finished_req_ids: set[str]) -> set[str]:
        """Requests to report as finished sending: vLLM finished them (now or in an earlier call) and their save
        is over; each is reported once, then forgotten."""
        self._finished |= finished_req_ids & self._saves.keys()
        done = {r for r in self._finished if self._saves[r].done.done()}
        self._finished -= done
        for req_id in done:
            del self._saves[req_id]
        return done

    def outcomes(self) -> dict[str, str]:
        """Saves completed since the last call: request id -> document key (or ``"failed: ..."``)."""
        with self._lock:
            out, self._outcomes = self._outcomes, {}
        return out

    def in_flight(self) -> int:
        """Saves not yet reported finished (running, or done for a request vLLM has not finished)."""
        return len(self._saves)

    def close(self) -> None:
        """Stop the thread after the saves already queued."""
        self._queue.put(None)
