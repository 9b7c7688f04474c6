"""`hrjax serve --bundle=BUNDLE`: a bundle's router behind the OpenAI API (FastAPI + uvicorn).

Endpoints: POST /v1/chat/completions and /v1/completions (JSON, or SSE with `stream: true`), GET /v1/models
(one entry per offered trade-off), /health, /metrics (Prometheus text). Every response carries the
route: `usage` counts tokens over all hops, and an `hrjax` field gives the cost lambda, each choice's
route, hops (model, text, tokens in/out, cost) and total cost. The trade-off is the model name
(`hrjax-router@cost=0.2`) or `"hrjax": {"cost_budget": x}` in the body (the calibrated lambda whose mean
cost per query meets x). Concurrent requests are batched (`batching.Scheduler`).

Refused with an OpenAI-style error body (the server keeps serving): malformed JSON or a non-object body
(400), a known field of the wrong type (400), an unknown model (404), an empty or too long prompt (400),
max_tokens < 1 or over `--max_tokens` (400), a body over `--max_request_bytes` (413), a missing or wrong
bearer token when `--api_key` (or HRJAX_API_KEY) is set (401), more than `--max_queue` requests in flight (429).
Streaming sends the role chunk at once and the answer when its route is done; a client that goes away
mid-stream cancels its route's queued steps.

Imports the bundle runtime, the sampler and the pool: never `hrjax.agent`, `hrjax.train` or Orbax.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hrjax.serving.batching import BatchLimits, QueueFullError, RequestTooLongError, Scheduler
from hrjax.serving.bundle import BundleError, UnknownModelError
from hrjax.generate.sampler import FINISH_LENGTH
from hrjax.serving.metrics import CONTENT_TYPE, ServerMetrics
from hrjax.serving.router import RouteState
from hrjax.serving.openai_api import (ApiError, ChatCompletionRequest, CompletionRequest, error_body, new_id, now,
                                      parse_request)

log = logging.getLogger("hrjax.serve")
MAX_PROMPTS_PER_REQUEST = 128  # a completion's list prompt


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """api_key: required bearer token (None: open); max_request_bytes: body size; max_prompt_chars: one
    question; max_tokens: the largest per-hop max_tokens a request may ask for."""

    api_key: Optional[str] = None
    max_request_bytes: int = 1 << 16
    max_prompt_chars: int = 4096
    max_tokens: int = 1024
    batch: BatchLimits = BatchLimits()


@dataclasses.dataclass(frozen=True)
class RouteRequest:
    """What one parsed request asks the router: its questions and how to answer them."""

    questions: list[str]
    lam: float
    sampling: Any  # SamplingParams
    seeded: bool


def _bearer_ok(request: Request, api_key: Optional[str]) -> bool:
    if api_key is None:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _finish_reason(state: RouteState) -> str:
    """'length' if the answering hop ran out of max_tokens, else 'stop' (EOS, a stop string, or STOP)."""
    return "length" if state.hops and state.hops[-1].finish_reason == FINISH_LENGTH else "stop"


def _hrjax_field(state: RouteState) -> dict:
    return {"route": [hop.model for hop in state.hops],
            "hops": [{"model": hop.model, "text": hop.text, "tokens_in": hop.tokens_in, "tokens_out": hop.tokens_out,
                      "cost": hop.cost} for hop in state.hops],
            "total_cost": state.total_cost}


def _usage(results: Sequence[RouteState]) -> dict:
    prompt = sum(hop.tokens_in for r in results for hop in r.hops)
    completion = sum(hop.tokens_out for r in results for hop in r.hops)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Server:
    """The app's state: the router, its scheduler, limits and metrics."""

    def __init__(self, router, limits: ServerLimits):
        self.router, self.limits = router, limits
        self.scheduler = Scheduler(router, limits.batch)
        self.metrics = ServerMetrics()
        self.offers = dict(router.offers())
        self.created = now()

    # ---- request parsing -------------------------------------------------------------------------
    async def read_json(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_request_bytes:
            raise self.too_large(int(declared))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limits.max_request_bytes:
                raise self.too_large(len(body))
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"The request body is not valid JSON ({e}). Send a JSON object.") from None

    def too_large(self, size: int) -> ApiError:
        return ApiError(413, f"The request body has {size} bytes, over the server's limit of "
                             f"{self.limits.max_request_bytes} (--max_request_bytes).", code="request_too_large")

    def route_request(self, request, questions: list[str]) -> RouteRequest:
        """Checks the model, trade-off, prompts and sampling settings of a parsed request."""
        budget = request.hrjax.cost_budget if request.hrjax is not None else None
        try:
            lam = self.router.lambda_for(request.model, budget=budget)
        except UnknownModelError as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
        except BundleError as e:  # a trade-off the bundle cannot serve
            raise ApiError(400, str(e), param="model" if budget is None else "hrjax.cost_budget") from None
        if len(questions) > MAX_PROMPTS_PER_REQUEST:
            raise ApiError(400, f"prompt: at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(questions)}.",
                           param="prompt")
        for question in questions:
            if not question.strip():
                raise ApiError(400, "The prompt is empty: send a question.", param="prompt")
            if len(question) > self.limits.max_prompt_chars:
                raise ApiError(400, f"The prompt has {len(question)} characters, over the server's limit of "
                                    f"{self.limits.max_prompt_chars} (--max_prompt_chars).", param="prompt")
        max_tokens = request.hop_max_tokens()
        if max_tokens is not None and not 1 <= max_tokens <= self.limits.max_tokens:
            raise ApiError(400, f"max_tokens must be in [1, {self.limits.max_tokens}] (tokens per hop), got "
                                f"{max_tokens}.", param="max_tokens")
        try:
            sampling = self.router.sampling(max_tokens=max_tokens, temperature=request.temperature or 0.0,
                                            stop=request.stop_strings(), seed=request.seed)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        if request.ignore_eos:
            sampling = dataclasses.replace(sampling, ignore_eos=True)
        for question in questions:
            try:
                self.scheduler.check_first_hop(question, sampling)
            except RequestTooLongError as e:
                raise ApiError(400, str(e), param="prompt") from None
        return RouteRequest(questions, lam, sampling, request.seed is not None)

    # ---- routing ---------------------------------------------------------------------------------
    async def route_one(self, ask: RouteRequest, question: str) -> RouteState:
        try:
            result = await self.scheduler.route(question, ask.lam, ask.sampling, ask.seeded)
        except QueueFullError as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full") from None
        except RequestTooLongError as e:
            raise ApiError(400, str(e), param="max_tokens") from None
        self.metrics.observe_route(result.hops, result.total_cost)
        return result

    async def route_all(self, ask: RouteRequest) -> list[RouteState]:
        tasks = [asyncio.ensure_future(self.route_one(ask, q)) for q in ask.questions]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    # ---- responses -------------------------------------------------------------------------------
    def chat_body(self, request: ChatCompletionRequest, ask: RouteRequest, result: RouteState) -> dict:
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": request.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                             "finish_reason": _finish_reason(result), "logprobs": None, "hrjax": _hrjax_field(result)}],
                "usage": _usage([result]),
                "hrjax": {"cost_lambda": ask.lam, "total_cost": result.total_cost}}

    def completion_body(self, request: CompletionRequest, ask: RouteRequest, results: list[RouteState]) -> dict:
        choices = [{"index": i, "text": r.answer, "finish_reason": _finish_reason(r), "logprobs": None,
                    "hrjax": _hrjax_field(r)} for i, r in enumerate(results)]
        return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": request.model,
                "choices": choices, "usage": _usage(results),
                "hrjax": {"cost_lambda": ask.lam, "total_cost": sum(r.total_cost for r in results)}}

    async def chat_stream(self, request: ChatCompletionRequest, ask: RouteRequest) -> AsyncIterator[str]:
        base = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": request.model}
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})
        result = await self.route_one(ask, ask.questions[0])
        yield _sse({**base, "choices": [{"index": 0, "delta": {"content": result.answer}, "finish_reason": None}]})
        yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": _finish_reason(result),
                                         "hrjax": _hrjax_field(result)}],
                    "hrjax": {"cost_lambda": ask.lam, "total_cost": result.total_cost}})
        if request.include_usage():
            yield _sse({**base, "choices": [], "usage": _usage([result])})

    async def completion_stream(self, request: CompletionRequest, ask: RouteRequest) -> AsyncIterator[str]:
        """One text chunk per prompt as its route finishes (any order, `index` says which), then usage."""
        base = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": request.model}
        results = []

        async def indexed(i, question):
            return i, await self.route_one(ask, question)
        tasks = [asyncio.ensure_future(indexed(i, q)) for i, q in enumerate(ask.questions)]
        try:
            for next_done in asyncio.as_completed(tasks):
                i, result = await next_done
                results.append(result)
                yield _sse({**base, "choices": [{"index": i, "text": result.answer,
                                                 "finish_reason": _finish_reason(result), "logprobs": None,
                                                 "hrjax": _hrjax_field(result)}]})
        finally:
            for task in tasks:
                task.cancel()
        if request.include_usage():
            yield _sse({**base, "choices": [], "usage": _usage(results)})

    async def sse_response(self, chunks: AsyncIterator[str], endpoint: str, start: float) -> StreamingResponse:
        async def body():
            status = 200
            try:
                async for chunk in chunks:
                    yield chunk
                yield _sse("[DONE]")
            except (asyncio.CancelledError, GeneratorExit):  # the client went away: its route is cancelled
                status = 499
                raise
            except ApiError as e:  # after the stream began: the error is the stream's last event
                status = e.status
                yield _sse(e.body())
            except Exception:  # noqa: BLE001 -- one request's failure must not stop the server
                log.exception("streamed request failed")
                status = 500
                yield _sse(error_body("The server failed to answer this request.", "server_error"))
            finally:
                self.metrics.observe_request(endpoint, status, time.perf_counter() - start)
        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def completions(self, request: Request, schema, endpoint: str) -> Response:
        start = time.perf_counter()
        parsed = parse_request(schema, await self.read_json(request))
        questions = [parsed.question()] if schema is ChatCompletionRequest else parsed.questions()
        ask = self.route_request(parsed, questions)
        if parsed.stream:
            stream = self.chat_stream if schema is ChatCompletionRequest else self.completion_stream
            return await self.sse_response(stream(parsed, ask), endpoint, start)
        results = await self.route_all(ask)
        body = (self.chat_body(parsed, ask, results[0]) if schema is ChatCompletionRequest
                else self.completion_body(parsed, ask, results))
        self.metrics.observe_request(endpoint, 200, time.perf_counter() - start)
        return JSONResponse(body)


def create_app(router, limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The FastAPI app serving `router` (a `BundleRouter`)."""
    server: Optional[Server] = None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal server
        server = Server(router, limits)
        await server.scheduler.start()
        app.state.server = server
        try:
            yield
        finally:
            await server.scheduler.close()

    app = FastAPI(title="hrjax serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(request: Request, error: ApiError) -> JSONResponse:
        if server is not None and request.url.path.startswith("/v1/"):
            server.metrics.observe_request(request.url.path, error.status, 0.0)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = "not_found" if error.status_code == 404 else None
        return error_response(request, ApiError(error.status_code, f"{request.method} {request.url.path}: "
                                                                   f"{error.detail}.", code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("request failed")
        return error_response(request, ApiError(500, "The server failed to answer this request.", "server_error"))

    def authorised(request: Request) -> None:
        if not _bearer_ok(request, limits.api_key):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the key the "
                                "server was started with.", code="invalid_api_key")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorised(request)
        return await server.completions(request, ChatCompletionRequest, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorised(request)
        return await server.completions(request, CompletionRequest, "/v1/completions")

    @app.get("/v1/models")
    async def models(request: Request):
        authorised(request)
        data = [{"id": name, "object": "model", "created": server.created, "owned_by": "hrjax",
                 "hrjax": {"cost_lambda": lam}} for name, lam in server.offers.items()]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        ok = server is not None and server.scheduler.healthy
        body = {"status": "ok" if ok else "unavailable", "models": list(server.offers) if server else [],
                "pool": [m.spec.name for m in router.pool.models],
                "in_flight": server.scheduler.in_flight if server else 0}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        authorised(request)
        stats = server.scheduler.stats
        text = server.metrics.render(server.scheduler.in_flight, stats.calls, stats.rows, stats.seconds,
                                     stats.prompt_cache_hits)
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    return app


def build_parser(prog: str) -> argparse.ArgumentParser:
    defaults = ServerLimits()
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="a bundle directory written by `hrjax export`")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=os.environ.get("HRJAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $HRJAX_API_KEY; unset: no auth)")
    p.add_argument("--max_request_bytes", type=int, default=defaults.max_request_bytes)
    p.add_argument("--max_prompt_chars", type=int, default=defaults.max_prompt_chars)
    p.add_argument("--max_tokens", type=int, default=defaults.max_tokens, help="largest max_tokens (per hop) allowed")
    p.add_argument("--max_queue", type=int, default=defaults.batch.max_queue, help="requests in flight before 429")
    p.add_argument("--max_batch", type=int, default=defaults.batch.max_batch,
                   help="decode slots per pool model (rows generated together)")
    p.add_argument("--steps_per_dispatch", type=int, default=defaults.batch.steps_per_dispatch,
                   help="decode steps per engine call (how long a new request may wait for its prefill)")
    p.add_argument("--prompt_cache", type=int, default=defaults.batch.prompt_cache,
                   help="prompts kept per pool model and prompt-length bucket, so that a repeated hop prompt is "
                        "not prefilled again (memory: this x the bucket's tokens x the model's KV bytes per token; "
                        "0: off)")
    p.add_argument("--batch_window_ms", type=float, default=defaults.batch.window_s * 1e3,
                   help="how long a policy call waits for requests in flight to join it")
    p.add_argument("--compilation_cache", default="~/.cache/hrjax/xla",
                   help="JAX's persistent compilation cache: a restarted server loads the programs it compiled "
                        "before from here instead of compiling them again ('' turns it off; "
                        "$JAX_COMPILATION_CACHE_DIR wins)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the router's encoder and policy programs for every batch shape before listening, "
                        "so that no request waits for a compilation (--no-warmup: compile on first use)")
    p.add_argument("--log_level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: Sequence[str]) -> int:
    parser = build_parser(argv[0])
    args = parser.parse_args(argv[1:])
    import uvicorn

    from hrjax.runtime import use_compilation_cache
    from hrjax.serving.bundle import load_bundle
    from hrjax.serving.router import BundleRouter

    if args.compilation_cache:
        use_compilation_cache(Path(args.compilation_cache).expanduser())
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        batch = BatchLimits(window_s=args.batch_window_ms / 1e3, max_batch=args.max_batch,
                            steps_per_dispatch=args.steps_per_dispatch, max_queue=args.max_queue,
                            prompt_cache=args.prompt_cache)
    except ValueError as e:  # exits 2 with the message
        parser.error(f"{e} Fix the flag: --batch_window_ms (window_s x 1000), --max_batch, --steps_per_dispatch, "
                     "--max_queue or --prompt_cache.")
    limits = ServerLimits(api_key=args.api_key or None, max_request_bytes=args.max_request_bytes,
                          max_prompt_chars=args.max_prompt_chars, max_tokens=args.max_tokens, batch=batch)
    router = BundleRouter(load_bundle(args.bundle))
    if args.warmup:
        started = time.perf_counter()
        shapes = router.warm_up(args.max_queue)
        print(f"hrjax serve: compiled the router for {shapes} batch shapes in {time.perf_counter() - started:.1f} s",
              flush=True)
    app = create_app(router, limits)
    print(f"hrjax serve: {args.bundle} on http://{args.host}:{args.port}/v1 (models: {', '.join(router.offers())})",
          flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn shut down gracefully, then re-raised SIGINT
        pass
    return 0
