"""The serving scheduler: concurrent requests share batched policy calls and batched sampler calls.

Each request is a coroutine that walks its route hop by hop (`Scheduler.route`): it asks for a decision,
then, unless the router stops, for one generation from the chosen pool model, and advances its state.
Those asks wait in queues:

- decisions: every waiting state goes into one `router.decide` call (one batched policy evaluation);
- generations: one queue per (pool model, sampling group). A sampling group is the request's
  `SamplingParams` without `max_new_tokens`: greedy requests with the same stop strings share a call
  whatever their `max_tokens` (the call runs to the largest, each row is cut to its own: greedy rows
  are unchanged by a longer budget); unseeded sampled requests share a call per temperature/top-p/stop
  (the call takes one of their fresh random seeds; each row draws its own noise); a request with a `seed`
  and temperature > 0 runs alone, so the same seed gives the same text whatever else is being served.

One dispatcher task runs the queue whose oldest entry has waited longest, as one call in a single
worker thread (the model calls leave the event loop free to accept and answer HTTP). Before each call
it waits up to `window_s` for the requests in flight to queue their next step (the collection window:
a lone request never waits, a burst is gathered). Admission is bounded: more than `max_queue` requests
in flight are refused (`QueueFullError`, HTTP 429) instead of queuing without limit.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import secrets
import time
from typing import Callable, Optional, Sequence

from hrjax.errors import HrjaxError
from hrjax.generate.sampler import FINISH_LENGTH, Generation, SamplingParams


class QueueFullError(HrjaxError, RuntimeError):
    """More requests are in flight than the server admits (`--max_queue`): retry later."""


class RequestTooLongError(HrjaxError, ValueError):
    """A hop's prompt plus its `max_tokens` does not fit the chosen model's context."""


@dataclasses.dataclass(frozen=True)
class BatchLimits:
    """window_s: the collection window (seconds); max_batch: rows per model call; max_queue: requests
    in flight (routing or waiting) before new ones are refused."""

    window_s: float = 0.002
    max_batch: int = 64
    max_queue: int = 1024

    def __post_init__(self):
        if self.window_s < 0 or self.max_batch < 1 or self.max_queue < 1:
            raise ValueError(f"BatchLimits need window_s >= 0, max_batch >= 1, max_queue >= 1; got {self}.")


@dataclasses.dataclass
class _Job:
    """One queued step of one request: a decision (payload: (state, lam)) or a generation (payload:
    (prompt ids, SamplingParams))."""

    payload: tuple
    future: asyncio.Future
    enqueued: float


@dataclasses.dataclass
class BatchStats:
    """What the dispatcher did, for /metrics: calls and rows per queue name ('decide' or a model)."""

    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rows: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # in the worker


def sampling_group(sampling: SamplingParams, seeded: bool, request_id: int) -> tuple:
    """The key under which generations may share one sampler call (see the module docstring)."""
    shared = dataclasses.replace(sampling, max_new_tokens=1, seed=0)
    if sampling.greedy or not seeded:
        return (shared,)
    return (shared, request_id)


def cut_to_budget(generation: Generation, max_new_tokens: int) -> Generation:
    """A row of a call that ran to a larger budget, cut to its own `max_new_tokens`."""
    if len(generation.tokens) <= max_new_tokens:
        return generation
    return dataclasses.replace(generation, tokens=generation.tokens[:max_new_tokens],
                               logprobs=generation.logprobs[:max_new_tokens], finish_reason=FINISH_LENGTH)


class Scheduler:
    """Routes questions through `router` (a `BundleRouter`) with batching across concurrent requests.

    Call `start()` from the event loop that will call `route`, and `close()` when done.
    """

    def __init__(self, router, limits: BatchLimits = BatchLimits()):
        self.router = router
        self.limits = limits
        self.models = router.pool.models
        self.stats = BatchStats()
        self.in_flight = 0
        self._decisions: collections.deque[_Job] = collections.deque()
        self._generations: dict[tuple, collections.deque[_Job]] = {}
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._task: Optional[asyncio.Task] = None
        self._queued = asyncio.Event()
        self._next_request_id = 0

    async def start(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hrjax-model")
        self._queued = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="hrjax-dispatcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        for job in [*self._decisions, *(j for q in self._generations.values() for j in q)]:
            job.future.cancel()

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def route(self, question: str, lam: float, sampling: SamplingParams, seeded: bool = False):
        """Routes one question at cost_lambda `lam` to its finished `RouteState`. Raises QueueFullError when
        `max_queue` requests are in flight, RequestTooLongError when a hop's prompt does not fit its model."""
        if self.in_flight >= self.limits.max_queue:
            raise QueueFullError(f"{self.in_flight} requests in flight, the server's limit (--max_queue); retry later.")
        self.in_flight += 1
        request_id, self._next_request_id = self._next_request_id, self._next_request_id + 1
        if not (sampling.greedy or seeded):  # a fresh draw per request (its group's call uses one of them)
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(31))
        try:
            state = self.router.start(question)
            while not state.finished:
                action = await self._enqueue(self._decisions, (state, lam))
                generation, prompt = None, None
                if action < len(self.models):
                    prompt = self.router.prompt(state, action)
                    self._check_fits(action, prompt, sampling, len(state.hops))
                    key = (action, *sampling_group(sampling, seeded, request_id))
                    queue = self._generations.setdefault(key, collections.deque())
                    generation = await self._enqueue(queue, (prompt, sampling))
                state = self.router.advance(state, action, generation, None if prompt is None else len(prompt))
            return state
        finally:
            self.in_flight -= 1

    def check_first_hop(self, question: str, sampling: SamplingParams) -> None:
        """RequestTooLongError unless the question's first-hop prompt, plus max_new_tokens, fits every pool
        model (whichever the policy picks): a request is refused before it is queued."""
        state = self.router.start(question)
        for action in range(len(self.models)):
            self._check_fits(action, self.router.prompt(state, action), sampling, 0)

    def _check_fits(self, action: int, prompt: Sequence[int], sampling: SamplingParams, hop: int) -> None:
        model = self.models[action]
        context = model.sampler.config.max_position_embeddings
        if len(prompt) + sampling.max_new_tokens > context:
            raise RequestTooLongError(
                f"Hop {hop} went to model '{model.spec.name}', whose context is {context} tokens: the hop's prompt "
                f"has {len(prompt)} tokens and max_tokens is {sampling.max_new_tokens}. Shorten the prompt or lower "
                "max_tokens.")

    def _enqueue(self, queue: collections.deque, payload: tuple) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        queue.append(_Job(payload, future, time.monotonic()))
        self._queued.set()
        return future

    def _waiting(self) -> int:
        return len(self._decisions) + sum(len(q) for q in self._generations.values())

    async def _gather(self) -> None:
        """Waits until something is queued, then up to `window_s` for every request in flight to queue
        its next step."""
        while not self._waiting():
            self._queued.clear()
            await self._queued.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.window_s
        while self._waiting() < self.in_flight and (remaining := deadline - loop.time()) > 0:
            self._queued.clear()
            try:
                await asyncio.wait_for(self._queued.wait(), remaining)
            except TimeoutError:
                break

    def _take(self, queue: collections.deque, fits: Callable[[list[_Job], _Job], bool]) -> list[_Job]:
        """Up to max_batch live jobs from the front of `queue`, oldest first, while `fits`."""
        jobs: list[_Job] = []
        while queue and len(jobs) < self.limits.max_batch:
            if queue[0].future.done():  # its request went away (client disconnected)
                queue.popleft()
            elif not fits(jobs, queue[0]):
                break
            else:
                jobs.append(queue.popleft())
        return jobs

    def _oldest_queue(self) -> tuple[Optional[tuple], collections.deque]:
        """(generation key or None for decisions, queue) of the queue whose front waited longest."""
        candidates = [(None, self._decisions)] if self._decisions else []
        candidates += [(key, q) for key, q in self._generations.items() if q]
        return min(candidates, key=lambda c: c[1][0].enqueued)

    async def _dispatch(self) -> None:
        while True:
            await self._gather()
            key, queue = self._oldest_queue()
            if key is None:
                name, jobs = "decide", self._take(queue, lambda jobs, job: True)
                call = functools.partial(self._decide, jobs)
            else:
                model = self.models[key[0]]
                name, jobs = model.spec.name, self._take(queue, self._fits_model(model))
                call = functools.partial(self._generate, model, jobs)
            for k in [k for k, q in self._generations.items() if not q]:
                del self._generations[k]
            if jobs:
                await self._run(name, jobs, call)

    async def _run(self, name: str, jobs: list[_Job], call: Callable[[], list]) -> None:
        """One call in the worker thread; each job's future gets its row, or the call's error (a failed call
        fails its own requests, never the dispatcher). Futures already cancelled are left alone."""
        self.stats.calls[name] += 1
        self.stats.rows[name] += len(jobs)
        started = time.perf_counter()
        results, error = None, None
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except Exception as e:  # noqa: BLE001 -- handed to the requests of this call
            error = e
        finally:
            self.stats.seconds[name] += time.perf_counter() - started
        for i, job in enumerate(jobs):
            if not job.future.done():
                if error is None:
                    job.future.set_result(results[i])
                else:
                    job.future.set_exception(error)

    def _decide(self, jobs: list[_Job]) -> list[int]:
        return self.router.decide([j.payload[0] for j in jobs], [j.payload[1] for j in jobs])

    @staticmethod
    def _fits_model(model) -> Callable[[list[_Job], _Job], bool]:
        """A generation joins a call while the longest prompt plus the largest budget fits the context."""
        context = model.sampler.config.max_position_embeddings

        def fits(jobs: list[_Job], job: _Job) -> bool:
            rows = [*jobs, job]
            return (max(len(j.payload[0]) for j in rows) + max(j.payload[1].max_new_tokens for j in rows)
                    <= context)
        return fits

    @staticmethod
    def _generate(model, jobs: list[_Job]) -> list[Generation]:
        """One sampler call for rows of one sampling group, each cut to its own max_new_tokens and decoded
        (cut before the first stop string)."""
        budget = max(j.payload[1].max_new_tokens for j in jobs)
        call_sampling = dataclasses.replace(jobs[0].payload[1], max_new_tokens=budget)
        generations = model.sampler.generate_tokens([j.payload[0] for j in jobs], call_sampling)
        return [model.sampler.with_text(cut_to_budget(g, j.payload[1].max_new_tokens), call_sampling.stop)
                for g, j in zip(generations, jobs)]
