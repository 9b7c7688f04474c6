"""The server's Prometheus metrics, kept in plain counters and written in the text exposition format
(version 0.0.4) by `ServerMetrics.render`, so serving needs no metrics client library."""

from __future__ import annotations

import bisect
import collections
import dataclasses
from typing import Iterable

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, escaped)) + "}"


@dataclasses.dataclass
class ServerMetrics:
    """Counters the server updates from its event loop (one thread: no locks needed)."""

    requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (endpoint, status)
    latency_counts: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0
    tokens: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # 'prompt' | 'completion'
    cost: float = 0.0
    routes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # 'paren>mul'
    hops: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # model name

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, str(status))] += 1
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.latency_sum_s += seconds

    def observe_route(self, hops: Iterable, total_cost: float) -> None:
        """One routed question: its hops (each with .model, .tokens_in, .tokens_out) and its cost."""
        names = []
        for hop in hops:
            names.append(hop.model)
            self.hops[hop.model] += 1
            self.tokens["prompt"] += hop.tokens_in
            self.tokens["completion"] += hop.tokens_out
        self.routes[">".join(names) or "none"] += 1
        self.cost += total_cost

    def render(self, in_flight: int, batch_calls: dict, batch_rows: dict, batch_seconds: dict,
               prompt_cache_hits: dict) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, doc: str, samples: Iterable[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value:.10g}" for labels, value in samples)

        family("hrjax_requests_total", "counter", "HTTP requests answered, by endpoint and status.",
               ((_labels(endpoint=e, status=s), n) for (e, s), n in sorted(self.requests.items())))
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS_S, "+Inf"), self.latency_counts):
            cumulative += count
            buckets.append((_labels(le=str(bound)), cumulative))
        lines.extend(["# HELP hrjax_request_latency_seconds Time from request to full response.",
                      "# TYPE hrjax_request_latency_seconds histogram"])
        lines.extend(f"hrjax_request_latency_seconds_bucket{labels} {value}" for labels, value in buckets)
        lines.append(f"hrjax_request_latency_seconds_sum {self.latency_sum_s:.10g}")
        lines.append(f"hrjax_request_latency_seconds_count {cumulative}")
        family("hrjax_tokens_total", "counter", "Tokens over all hops: prompt (in) and completion (out).",
               ((_labels(kind=k), n) for k, n in sorted(self.tokens.items())))
        family("hrjax_cost_total", "counter", "Routing cost of the answered questions (the bundle's cost units).",
               [("", self.cost)])
        family("hrjax_routes_total", "counter", "Answered questions by route (pool models in hop order).",
               ((_labels(route=r), n) for r, n in sorted(self.routes.items())))
        family("hrjax_hops_total", "counter", "Hops answered, by pool model.",
               ((_labels(model=m), n) for m, n in sorted(self.hops.items())))
        family("hrjax_batch_calls_total", "counter", "Batched model calls, by queue (decide or a pool model).",
               ((_labels(queue=q), n) for q, n in sorted(batch_calls.items())))
        family("hrjax_batch_rows_total", "counter", "Rows over those calls (rows / calls = mean batch size).",
               ((_labels(queue=q), n) for q, n in sorted(batch_rows.items())))
        family("hrjax_batch_seconds_total", "counter", "Wall time of those calls in the model worker thread.",
               ((_labels(queue=q), n) for q, n in sorted(batch_seconds.items())))
        family("hrjax_prompt_cache_hits_total", "counter", "Hops admitted from the prompt cache (no prefill), by "
               "pool model.", ((_labels(model=m), n) for m, n in sorted(prompt_cache_hits.items())))
        family("hrjax_in_flight", "gauge", "Requests being routed now.", [("", in_flight)])
        return "\n".join(lines) + "\n"
