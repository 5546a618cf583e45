"""Dynamic batching that forms a batch when the model is free to run it.

    batcher = DynamicBatcher(run, max_batch_size=16, batch_wait_timeout_s=0.01, size_fn=len)
    answer = await batcher.submit(request)      # from any number of concurrent requests

Requests queue while a forward pass runs. When it ends, the next batch takes everything queued, up
to ``max_batch_size`` items (``size_fn`` measures a request); an idle model waits at most
``batch_wait_timeout_s`` after the oldest queued request for the batch to fill. These are the
semantics of Triton's dynamic batcher (``max_queue_delay``), and what ``@serve.batch`` did before
it could run concurrent batches (ray-project/ray#53096). In Ray 2.60 ``@serve.batch`` forms the
next batch on its timer even while the previous one is still running, and queues it behind a
semaphore: under load a model slower than the timer gets a stream of batches of one or two
requests (bench/NOTES.md, serve: batches of 1-3 at 32 concurrent clients). One batch runs at a time.

``group_fn`` keeps requests apart that must not share a batch: a batch holds requests of one group
(the oldest queued request's); the others keep their places for the next batches. A replica groups
requests by the model they were validated against, so a hot swap never runs a request queued
before it on the new model.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional


@dataclass
class _Queued:
    request: Any
    size: int
    arrived: float
    future: asyncio.Future


class DynamicBatcher:
    """One per replica; ``run(requests) -> results`` (one result per request, in order)."""

    def __init__(self, run: Callable[[list], Awaitable[list]], max_batch_size: int, batch_wait_timeout_s: float,
                 size_fn: Callable[[Any], int] = lambda request: 1,
                 group_fn: Callable[[Any], Hashable] = lambda request: None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be at least 0, got {batch_wait_timeout_s}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.size_fn = size_fn
        self.group_fn = group_fn
        self._queue: deque[_Queued] = deque()
        self._arrived: Optional[asyncio.Event] = None  # made in the event loop that serves requests
        self._worker: Optional[asyncio.Task] = None

    async def submit(self, request: Any) -> Any:
        """Queue ``request`` and wait for its result (or the exception its batch raised)."""
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        size = self.size_fn(request)
        if size > self.max_batch_size:  # never formed: the serve config keeps max_items <= max_batch_size
            raise ValueError(f"a request of {size} items exceeds max_batch_size ({self.max_batch_size})")
        queued = _Queued(request, size, loop.time(), loop.create_future())
        self._queue.append(queued)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        return await queued.future  # a cancelled caller's request is skipped when its batch is formed

    def _queued_items(self) -> int:
        return sum(q.size for q in self._queue if not q.future.done())

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                self._drop_cancelled()
            deadline = self._queue[0].arrived + self.batch_wait_timeout_s
            while self._queued_items() < self.max_batch_size and loop.time() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._run(batch)
            # Not held while waiting for the next request: a batch's requests reference the model
            # they were checked against, which a hot swap has to be able to free.
            del batch

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def _take(self) -> list[_Queued]:
        """The oldest requests of the oldest request's group that fit in one batch, in arrival order;
        requests of other groups keep their places in the queue."""
        self._drop_cancelled()
        if not self._queue:
            return []
        group = self.group_fn(self._queue[0].request)
        batch, items = [], 0
        kept: deque[_Queued] = deque()
        while self._queue:
            head = self._queue.popleft()
            if head.future.done():
                continue
            if self.group_fn(head.request) != group:
                kept.append(head)
                continue
            if items + head.size > self.max_batch_size:  # never past a request of its group: no overtaking
                kept.append(head)
                kept.extend(self._queue)
                break
            batch.append(head)
            items += head.size
        self._queue = kept
        return batch

    async def _run(self, batch: list[_Queued]) -> None:
        try:
            results = await self.run([q.request for q in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} requests")
        except Exception as e:  # every request of the batch gets the error; the batcher goes on
            for q in batch:
                if not q.future.done():
                    q.future.set_exception(e)
            return
        for q, result in zip(batch, results):
            if not q.future.done():
                q.future.set_result(result)
