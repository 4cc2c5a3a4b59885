"""Prometheus metrics: counters and histograms kept in plain dicts, rendered as text.

Labels are bounded by construction: ``model`` is only recorded for requests that were
routed (a client's made-up model name gets the 404 and the label ``""``), ``endpoint``
is one of the gateway's own paths, and deployments are the configured ones.  ``error``
is the error code, which for an upstream's 4xx is the upstream's own (any string):
codes that are not plain identifiers become ``invalid``, and past ``MAX_ERROR_LABELS``
distinct codes new ones become ``other``.  ``model`` is bounded the same way
(``MAX_MODEL_LABELS``): names routed by prefix (``gpt-*``, ``claude-*``) are any name
a client sends.  Every label value is escaped.
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from typing import Any

# Seconds; from 1 ms (cache hits, the gateway's own overhead) to 5 min (long answers).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0, 120.0, 300.0)
_STATE = {"closed": 0, "half_open": 1, "open": 2}
# Far more than the gateway's own codes (a few dozen) and the ones upstreams use.
MAX_ERROR_LABELS = 100
# Far more than any deployment routes; a client sending "gpt-<random>" is routed by
# prefix (and gets the upstream's 404), and must not add a series per request.
MAX_MODEL_LABELS = 1000
_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.:-]{0,64}$")


class Histogram:
    __slots__ = ("counts", "total", "n")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, int, str], int] = {}
        self.tokens: dict[tuple[str, str, str], int] = {}
        self.cost_pico: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.ttft: dict[str, Histogram] = {}
        self.sources: list[Callable[[], dict[str, Any]]] = []
        self.health: Callable[[float], list[tuple[str, str, Any]]] | None = None
        self.error_labels: set[str] = set()
        self.model_labels: set[str] = set()

    # The label for a model or error code not seen before (record checks the known ones).
    def _model_label(self, model: str) -> str:
        if len(self.model_labels) >= MAX_MODEL_LABELS:
            return "other"
        self.model_labels.add(model)
        return model

    def _error_label(self, error: str) -> str:
        if not _ERROR_CODE.match(error):
            return "invalid"
        if len(self.error_labels) >= MAX_ERROR_LABELS:
            return "other"
        self.error_labels.add(error)
        return error

    def record(self, endpoint: str, model: str, provider: str, status: int, error: str,
               latency_s: float, ttft_s: float | None, prompt: int, completion: int,
               cost_pico: int | None = None) -> None:
        if model not in self.model_labels:
            model = self._model_label(model)
        if error not in self.error_labels:
            error = self._error_label(error)
        key = (endpoint, model, provider, status, error)
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.latency.get(endpoint)
        if h is None:
            h = self.latency[endpoint] = Histogram()
        h.observe(latency_s)
        if ttft_s is not None:
            t = self.ttft.get(endpoint)
            if t is None:
                t = self.ttft[endpoint] = Histogram()
            t.observe(ttft_s)
        if cost_pico:
            k2 = (model, provider)
            self.cost_pico[k2] = self.cost_pico.get(k2, 0) + cost_pico
        if prompt or completion:
            for kind, n in (("prompt", prompt), ("completion", completion)):
                k = (model, provider, kind)
                self.tokens[k] = self.tokens.get(k, 0) + n

    def render(self, now: float) -> bytes:
        out: list[str] = []
        out += ["# HELP gateway_requests_total Requests by endpoint, model, provider, status.",
                "# TYPE gateway_requests_total counter"]
        for (ep, model, prov, status, err), n in sorted(self.requests.items()):
            out.append(f'gateway_requests_total{{endpoint="{_esc(ep)}",model="{_esc(model)}",'
                       f'provider="{_esc(prov)}",status="{status}",error="{_esc(err)}"}} {n}')
        out += ["# HELP gateway_tokens_total Tokens by model, provider and kind.",
                "# TYPE gateway_tokens_total counter"]
        for (model, prov, kind), n in sorted(self.tokens.items()):
            out.append(f'gateway_tokens_total{{model="{_esc(model)}",provider="{_esc(prov)}",'
                       f'kind="{kind}"}} {n}')
        out += ["# HELP gateway_cost_usd_total Spend by model and provider, in USD.",
                "# TYPE gateway_cost_usd_total counter"]
        for (model, prov), pico in sorted(self.cost_pico.items()):
            out.append(f'gateway_cost_usd_total{{model="{_esc(model)}",provider="{_esc(prov)}"}} '
                       f'{pico / 10**12:.12f}')
        for name, hists, what in (("gateway_request_duration_seconds", self.latency,
                                   "Time from request to the end of the response."),
                                  ("gateway_time_to_first_token_seconds", self.ttft,
                                   "Time from request to the first streamed event.")):
            out += [f"# HELP {name} {what}", f"# TYPE {name} histogram"]
            for ep, h in sorted(hists.items()):
                acc = 0
                for bound, c in zip(BUCKETS, h.counts):
                    acc += c
                    out.append(f'{name}_bucket{{endpoint="{ep}",le="{bound}"}} {acc}')
                out.append(f'{name}_bucket{{endpoint="{ep}",le="+Inf"}} {h.n}')
                out.append(f'{name}_sum{{endpoint="{ep}"}} {h.total}')
                out.append(f'{name}_count{{endpoint="{ep}"}} {h.n}')
        if self.health is not None:
            rows = self.health(now)
            for metric, help_, typ in (
                    ("gateway_deployment_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", "gauge"),
                    ("gateway_deployment_in_flight", "Requests in flight per deployment.", "gauge"),
                    ("gateway_deployment_requests_total", "Attempts per deployment.", "counter"),
                    ("gateway_deployment_failures_total", "Failed attempts per deployment.", "counter"),
                    ("gateway_deployment_opened_total", "Times the breaker opened.", "counter")):
                out += [f"# HELP {metric} {help_}", f"# TYPE {metric} {typ}"]
                out += [f'{metric}{{deployment="{_esc(dep)}"}} {value}'
                        for dep, name, value in rows if name == metric]
        for source in self.sources:
            for name, value in sorted(source().items()):
                if isinstance(value, bool):
                    value = int(value)
                out.append(f"gateway_{name} {value}")
        return ("\n".join(out) + "\n").encode()


def health_rows(router: Any) -> Callable[[float], list[tuple[str, str, Any]]]:
    def rows(now: float) -> list[tuple[str, str, Any]]:
        out = []
        for h in router.health.values():
            out += [(h.name, "gateway_deployment_state", _STATE[h.state(now)]),
                    (h.name, "gateway_deployment_in_flight", h.in_flight),
                    (h.name, "gateway_deployment_requests_total", h.requests_total),
                    (h.name, "gateway_deployment_failures_total", h.failures_total),
                    (h.name, "gateway_deployment_opened_total", h.opened_total)]
        return out
    return rows


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
