"""The serving scheduler: concurrent requests share batched policy calls and in-flight batched generation.

Each request is a coroutine that walks its route hop by hop (`Scheduler.route`): it asks for a decision,
then, unless the router stops, for one generation from the chosen pool model, and advances its state.

- Decisions wait in one queue; every waiting state goes into one `router.decide` call (one batched
  policy evaluation). Before such a call the dispatcher waits up to `window_s` for the requests in
  flight to queue their next step (the collection window: a lone request never waits, a burst is
  gathered).
- Generations go straight into their pool model's in-flight batching engine
  (`hrjax.generate.inflight.InflightEngine`): a fixed set of decode slots where a finished row's slot
  takes the next waiting prompt at once, each row with its own `max_tokens`, temperature, top-p, stop
  strings and seed (a seeded row draws the same tokens whatever else is being served).

One dispatcher task alternates between the decision queue and one decode dispatch of every busy engine,
each run as one call in a single worker thread (the model calls leave the event loop free to accept and
answer HTTP). Admission is bounded: more than `max_queue` requests in flight are refused
(`QueueFullError`, HTTP 429) instead of queuing without limit.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import secrets
import time
from typing import Callable, Optional

from hrjax.errors import HrjaxError
from hrjax.generate.inflight import InflightEngine
from hrjax.generate.sampler import SamplingParams


class QueueFullError(HrjaxError, RuntimeError):
    """More requests are in flight than the server admits (`--max_queue`): retry later."""


class RequestTooLongError(HrjaxError, ValueError):
    """A hop's prompt plus its `max_tokens` does not fit the chosen model's context."""


@dataclasses.dataclass(frozen=True)
class BatchLimits:
    """window_s: the decisions' collection window (seconds); max_batch: decode slots per pool model (rows
    generated together); steps_per_dispatch: decode steps per engine call between the dispatcher's other
    work (a newcomer waits at most that long for its prefill); max_queue: requests in flight (routing or
    waiting) before new ones are refused; prompt_cache: prompts kept per pool model and prompt bucket, so
    that a repeated hop prompt is admitted without a prefill (`InflightEngine`; 0: off)."""

    window_s: float = 0.002
    max_batch: int = 32
    steps_per_dispatch: int = 16
    max_queue: int = 1024
    prompt_cache: int = 16

    def __post_init__(self):
        if (self.window_s < 0 or self.max_batch < 1 or self.steps_per_dispatch < 1 or self.max_queue < 1
                or self.prompt_cache < 0):
            raise ValueError(f"BatchLimits need window_s >= 0, prompt_cache >= 0 and max_batch, steps_per_dispatch, "
                             f"max_queue >= 1; got {self}.")


@dataclasses.dataclass
class _Job:
    """One queued step of one request: a decision (payload: (state, lam)) or a generation (payload:
    (model index, SamplingParams))."""

    payload: tuple
    future: asyncio.Future


@dataclasses.dataclass
class BatchStats:
    """What the dispatcher did, for /metrics: calls, rows finished and worker seconds per queue name
    ('decide' or a pool model's name), and hops admitted from the prompt cache per pool model."""

    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rows: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # in the worker
    prompt_cache_hits: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # per model


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
        self._engines = [self._engine(model) for model in self.models]
        self._generations: dict[tuple[int, int], _Job] = {}  # (model index, engine handle) -> its job
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._task: Optional[asyncio.Task] = None
        self._queued = asyncio.Event()

    def _engine(self, model) -> InflightEngine:
        return InflightEngine(model.sampler, slots=self.limits.max_batch,
                              steps_per_dispatch=self.limits.steps_per_dispatch, prompt_cache=self.limits.prompt_cache)

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
        for job in [*self._decisions, *self._generations.values()]:
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
        if not (sampling.greedy or seeded):  # a fresh draw per request
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(31))
        try:
            state = self.router.start(question)
            while not state.finished:
                action = await self._enqueue_decision(state, lam)
                generation, prompt = None, None
                if action < len(self.models):
                    prompt = self.router.prompt(state, action)
                    self._check_fits(action, prompt, sampling, len(state.hops))
                    generation = await self._enqueue_generation(action, prompt, sampling)
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

    def _check_fits(self, action: int, prompt, sampling: SamplingParams, hop: int) -> None:
        model = self.models[action]
        context = model.sampler.config.max_position_embeddings
        if len(prompt) + sampling.max_new_tokens > context:
            raise RequestTooLongError(
                f"Hop {hop} went to model '{model.spec.name}', whose context is {context} tokens: the hop's prompt "
                f"has {len(prompt)} tokens and max_tokens is {sampling.max_new_tokens}. Shorten the prompt or lower "
                "max_tokens.")

    def _enqueue_decision(self, state, lam: float) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._decisions.append(_Job((state, lam), future))
        self._queued.set()
        return future

    def _enqueue_generation(self, action: int, prompt, sampling: SamplingParams) -> asyncio.Future:
        """Hands the row to its model's engine (a queue append: the engine admits it at its next dispatch)."""
        future = asyncio.get_running_loop().create_future()
        handle = self._engines[action].submit(prompt, sampling)
        self._generations[(action, handle)] = _Job((action, sampling), future)
        self._queued.set()
        return future

    def _waiting(self) -> int:
        return len(self._decisions) + len(self._generations)

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

    async def _dispatch(self) -> None:
        while True:
            await self._gather()
            jobs = [job for job in (self._decisions.popleft() for _ in range(len(self._decisions)))
                    if not job.future.done()]  # a done future: its request went away (client disconnected)
            if jobs:
                results = await self._run("decide", functools.partial(self._decide, jobs))
                self._settle(jobs, results)
            for action, engine in enumerate(self._engines):
                # a done future: its request went away (client disconnected): its row is dropped
                gone = [key for key, job in self._generations.items() if key[0] == action and job.future.done()]
                for key in gone:
                    del self._generations[key]
                if not engine.idle:
                    finished = await self._run(self.models[action].spec.name, functools.partial(
                        self._step, action, engine, [handle for _, handle in gone]))
                    self._settle_generations(action, finished)

    async def _run(self, name: str, call: Callable[[], list]) -> list | BaseException:
        """One call in the worker thread -> its result, or the error it raised (handed to the requests
        it served; never the dispatcher's)."""
        self.stats.calls[name] += 1
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except Exception as e:  # noqa: BLE001 -- handed to the requests of this call
            return e
        finally:
            self.stats.seconds[name] += time.perf_counter() - started

    @staticmethod
    def _settle(jobs: list[_Job], results: list | BaseException) -> None:
        """Each job's future gets its row, or the call's error; futures already cancelled are left alone."""
        for i, job in enumerate(jobs):
            if not job.future.done():
                if isinstance(results, BaseException):
                    job.future.set_exception(results)
                else:
                    job.future.set_result(results[i])

    def _settle_generations(self, action: int, finished: list | BaseException) -> None:
        name = self.models[action].spec.name
        if isinstance(finished, BaseException):  # the engine's rows are lost: fail them, start it afresh
            jobs = [self._generations.pop(key) for key in [k for k in self._generations if k[0] == action]]
            self._engines[action] = self._engine(self.models[action])
            self._settle(jobs, finished)
            return
        self.stats.rows[name] += len(finished)
        for handle, generation in finished:
            self._settle([self._generations.pop((action, handle))], [generation])

    def _decide(self, jobs: list[_Job]) -> list[int]:
        self.stats.rows["decide"] += len(jobs)
        return self.router.decide([j.payload[0] for j in jobs], [j.payload[1] for j in jobs])

    def _step(self, action: int, engine: InflightEngine, cancelled: list[int]) -> list:
        """One decode dispatch of a model's engine -> [(handle, Generation with its text cut at its stop
        strings)] of the rows that finished; the `cancelled` handles are dropped first, freeing their slots."""
        for handle in cancelled:
            engine.cancel(handle)
        model, hits = self.models[action], engine.prompt_cache_hits
        finished = engine.step()
        self.stats.prompt_cache_hits[model.spec.name] += engine.prompt_cache_hits - hits
        return [(handle, model.sampler.with_text(generation, self._generations[(action, handle)].payload[1].stop))
                for handle, generation in finished]
