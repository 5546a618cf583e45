"""rayfine.serve.batching: batches form when the model is free, up to max_batch_size items.

Pure asyncio, no Ray: the batch function is a coroutine that records the batches it was given and
stays busy until the test releases it (``hold``/``release``), so what arrives while the model runs is
decided by the test, not by how fast this machine schedules it.
"""

from __future__ import annotations

import asyncio

import pytest

from rayfine.serve.batching import DynamicBatcher


class Model:
    def __init__(self, busy_s: float = 0.05, fail_on: object = None):
        self.batches: list[list] = []
        self.busy_s = busy_s
        self.fail_on = fail_on
        self.running = 0
        self.most_running = 0
        self._gate: asyncio.Event | None = None

    def hold(self) -> None:
        """From now on a batch runs until ``release()`` (call both inside the test's event loop)."""
        self._gate = asyncio.Event()

    def release(self) -> None:
        self._gate.set()

    async def __call__(self, requests: list) -> list:
        self.batches.append(list(requests))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await (self._gate.wait() if self._gate is not None else asyncio.sleep(self.busy_s))
            if self.fail_on is not None and self.fail_on in requests:
                raise RuntimeError("the model failed")
            return [f"answer-{r}" for r in requests]
        finally:
            self.running -= 1


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0)


def test_requests_queued_while_the_model_runs_form_the_next_batch():
    """Ray 2.60's @serve.batch would form several small batches while the first one ran."""
    async def main():
        model = Model()
        model.hold()
        batcher = DynamicBatcher(model, max_batch_size=16, batch_wait_timeout_s=0.005)
        first = asyncio.create_task(batcher.submit(0))
        await until(lambda: model.running)  # the first batch ([0]) is running now
        rest = []
        for i in range(1, 11):  # arrive one by one, 10 ms apart (twice the timeout), while the model is busy
            rest.append(asyncio.create_task(batcher.submit(i)))
            await asyncio.sleep(0.01)
        model.release()
        answers = await asyncio.gather(first, *rest)
        return model, answers

    model, answers = run(main())
    assert answers == [f"answer-{i}" for i in range(11)]
    assert model.batches == [[0], list(range(1, 11))]
    assert model.most_running == 1


def test_a_batch_holds_at_most_max_batch_size_items_and_never_splits_a_request():
    async def main():
        model = Model(busy_s=0.05)
        batcher = DynamicBatcher(model, max_batch_size=5, batch_wait_timeout_s=0.5, size_fn=len)
        requests = [["a", "b"], ["c", "d"], ["e", "f"], ["g"], ["h", "i", "j", "k", "l"]]
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
        return model, answers

    model, answers = run(main())
    assert [sum(len(r) for r in b) for b in model.batches] == [4, 3, 5]
    assert model.batches == [[["a", "b"], ["c", "d"]], [["e", "f"], ["g"]], [["h", "i", "j", "k", "l"]]]
    assert answers == [f"answer-{r}" for r in (["a", "b"], ["c", "d"], ["e", "f"], ["g"], ["h", "i", "j", "k", "l"])]


def test_an_idle_model_waits_for_the_batch_to_fill_but_not_longer_than_the_timeout():
    async def main():
        # A full batch runs at once: with a 60 s timeout, waiting for it would end in wait_for's 10 s.
        patient = Model(busy_s=0.0)
        batcher = DynamicBatcher(patient, max_batch_size=3, batch_wait_timeout_s=60)
        full = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(3))), 10)
        # An idle model does not run a lone request at once: one that comes later joins its batch.
        waiting = Model(busy_s=0.0)
        batcher = DynamicBatcher(waiting, max_batch_size=2, batch_wait_timeout_s=60)
        lone = asyncio.create_task(batcher.submit(7))
        await asyncio.sleep(0.05)
        company = await asyncio.wait_for(asyncio.gather(lone, batcher.submit(8)), 10)
        # A lone request that never fills its batch runs once the timeout has passed.
        model = Model(busy_s=0.0)
        batcher = DynamicBatcher(model, max_batch_size=3, batch_wait_timeout_s=0.3)
        alone = await asyncio.wait_for(batcher.submit(9), 10)
        return patient, full, waiting, company, model, alone

    patient, full, waiting, company, model, alone = run(main())
    assert patient.batches == [[0, 1, 2]] and full == ["answer-0", "answer-1", "answer-2"]
    assert waiting.batches == [[7, 8]] and company == ["answer-7", "answer-8"]
    assert model.batches == [[9]] and alone == "answer-9"


def test_a_failed_batch_fails_its_requests_only_and_the_batcher_goes_on():
    async def main():
        model = Model(busy_s=0.05, fail_on="bad")
        batcher = DynamicBatcher(model, max_batch_size=2, batch_wait_timeout_s=0.0)
        results = await asyncio.gather(*(batcher.submit(r) for r in ("ok1", "bad", "ok2")), return_exceptions=True)
        after = await batcher.submit("ok3")
        return results, after

    results, after = run(main())
    assert isinstance(results[0], RuntimeError) and isinstance(results[1], RuntimeError)  # one batch: [ok1, bad]
    assert results[2] == "answer-ok2" and after == "answer-ok3"


def test_a_cancelled_request_is_left_out_of_its_batch():
    async def main():
        model = Model()
        model.hold()
        batcher = DynamicBatcher(model, max_batch_size=8, batch_wait_timeout_s=0.0)
        first = asyncio.create_task(batcher.submit("first"))
        await until(lambda: model.running)
        gone = asyncio.create_task(batcher.submit("gone"))
        kept = asyncio.create_task(batcher.submit("kept"))
        await asyncio.sleep(0)  # both queue behind [first]
        gone.cancel()  # a client that disconnected while the model was busy
        await asyncio.sleep(0)
        model.release()
        return model, await first, await kept, gone.cancelled()

    model, first, kept, cancelled = run(main())
    assert (first, kept, cancelled) == ("answer-first", "answer-kept", True)
    assert model.batches == [["first"], ["kept"]]


def test_wrong_sizes_are_refused():
    with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
        DynamicBatcher(Model(), max_batch_size=0, batch_wait_timeout_s=0.01)

    async def main():
        batcher = DynamicBatcher(Model(), max_batch_size=2, batch_wait_timeout_s=0.0, size_fn=len)
        with pytest.raises(ValueError, match="exceeds max_batch_size"):
            await batcher.submit([1, 2, 3])

    run(main())


def test_requests_of_different_groups_never_share_a_batch():
    """A replica groups requests by the model they were checked against: after a hot swap, requests
    queued for the old model run on it, in their own batches, and the new model's wait their turn."""
    async def main():
        model = Model()
        model.hold()
        batcher = DynamicBatcher(model, max_batch_size=3, batch_wait_timeout_s=0.0, group_fn=lambda r: r[0])
        first = asyncio.create_task(batcher.submit("a0"))
        await until(lambda: model.running)  # the model runs [a0]; the rest queue meanwhile, the groups interleaved
        rest = [asyncio.create_task(batcher.submit(r)) for r in ("a1", "b1", "a2", "b2", "a3", "a4", "b3")]
        await asyncio.sleep(0)
        model.release()
        return model, await asyncio.gather(first, *rest)

    model, answers = run(main())
    assert answers == [f"answer-{r}" for r in ("a0", "a1", "b1", "a2", "b2", "a3", "a4", "b3")]
    # The oldest request's group first, up to max_batch_size, in arrival order; the others keep their places.
    assert model.batches == [["a0"], ["a1", "a2", "a3"], ["b1", "b2", "b3"], ["a4"]]


def test_the_batcher_holds_no_request_while_it_waits_for_the_next():
    """A request references the model it was checked against: after its batch, the idle batcher
    must not keep it, or a hot-swapped model stays loaded until the next request (after a rollback,
    three models at once)."""
    import gc
    import weakref

    class Swapped:  # stands for the model a request was checked against
        pass

    async def main():
        model = Model(busy_s=0.0)
        batcher = DynamicBatcher(model, max_batch_size=4, batch_wait_timeout_s=0.0)
        old = Swapped()
        gone = weakref.ref(old)
        assert await batcher.submit(old) == f"answer-{old}"
        model.batches.clear()
        del old
        for _ in range(3):
            await asyncio.sleep(0)  # the worker is back waiting for the next request
        gc.collect()
        return gone() is None, batcher._worker.done()

    freed, worker_done = run(main())
    assert freed and not worker_done
