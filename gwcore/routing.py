"""Model name -> deployments, and which deployment to try next.  Pure given ``now``.

A name declared under ``models:`` routes to its deployments.  Any other name routes by
its prefix (DESIGN.md): ``gpt-*``, ``o1*``, ``o3*``, ``o4*``, ``text-embedding-*`` to
OpenAI, ``claude-*`` to Anthropic, ``gemini-*`` to Google, each only when that
provider's key is set; a provider with several keys gets one deployment per key.  With
``--demo`` every other name goes to the ``mock`` provider.

Picking: among the deployments that are healthy and not yet tried by this request,
each gets the score ``u ** (1 / weight) / (1 + in_flight)`` with ``u`` uniform in (0, 1)
(weighted random sampling, Efraimidis-Spirakis, damped by current load), and the best
score wins: with no load a weight-3 deployment is picked three times as often as a
weight-1 one; under load the less busy one is preferred.

Circuit breaker, per deployment:

    state      event                                   next
    closed     a success                               closed (failures reset)
    closed     failure_threshold failures in a row     open until now + cooldown
    open       now < until                             skipped
    open       now >= until                            half-open: one probe request
    half-open  the probe succeeds                      closed, cooldown reset
    half-open  the probe fails                         open, cooldown doubled (max 10x)

Failures are connection errors, timeouts, 429 and 5xx; a client's own 4xx is not the
deployment's fault.  When every deployment of a route is open, the fallbacks are
tried; when nothing at all is left, the deployment whose cooldown ends first is tried
anyway, so a breaker can never turn a brief outage into a total one.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from gwcore.config import DEFAULT_BASE_URLS, Config, Deployment

PREFIXES: tuple[tuple[str, str], ...] = (
    ("gpt-", "openai"), ("o1", "openai"), ("o3", "openai"), ("o4", "openai"),
    ("text-embedding-", "openai"), ("claude-", "anthropic"), ("gemini-", "google"),
)

DEMO_BASE_URL = "mock://demo"
MAX_COOLDOWN_FACTOR = 10.0


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    deployments: tuple[Deployment, ...]
    fallbacks: tuple[str, ...] = ()
    timeout_s: float = 600.0
    retries: int = 2
    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float | None = None
    failure_threshold: int = 3
    cooldown_s: float = 30.0
    fallback_on_context_window: bool = False


class DeploymentHealth:
    __slots__ = ("name", "in_flight", "failures", "open_until", "cooldown_s", "probing",
                 "requests_total", "failures_total", "opened_total")

    def __init__(self, name: str, cooldown_s: float) -> None:
        self.name = name
        self.in_flight = 0
        self.failures = 0
        self.open_until: float | None = None
        self.cooldown_s = cooldown_s
        self.probing = False
        self.requests_total = 0
        self.failures_total = 0
        self.opened_total = 0

    def state(self, now: float) -> str:
        if self.open_until is None:
            return "closed"
        return "open" if now < self.open_until or self.probing else "half_open"

    def available(self, now: float) -> bool:
        return self.open_until is None or self.state(now) != "open"


def deployment_id(route: str, index: int, dep: Deployment) -> str:
    return f"{route}/{index}:{dep.provider}:{dep.model}"


class Router:
    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self.demo = cfg.demo
        self._named = {m.name: Route(m.name, tuple(m.deployments), tuple(m.fallbacks),
                                     m.timeout_s, m.retries, m.connect_timeout_s,
                                     m.first_byte_timeout_s, m.failure_threshold,
                                     m.cooldown_s, m.fallback_on_context_window)
                       for m in cfg.models}
        self._implicit: dict[str, Route | None] = {}
        self.health: dict[str, DeploymentHealth] = {}
        # (id(route), index) -> (route, its health): health_of without building the
        # deployment's id each time; the route is kept to tell a reused id apart.
        self._health_at: dict[tuple[int, int], tuple[Route, DeploymentHealth]] = {}

    # -- resolving ----------------------------------------------------------------
    def resolve(self, model: str) -> Route | None:
        route = self._named.get(model)
        if route is not None:
            return route
        if model in self._implicit:
            return self._implicit[model]
        route = self._by_prefix(model)
        if len(self._implicit) < 10_000:  # bounded: model names come from clients
            self._implicit[model] = route
        return route

    def _by_prefix(self, model: str) -> Route | None:
        for prefix, provider in PREFIXES:
            if model.startswith(prefix):
                keys = self._cfg.provider(provider).keys()
                if keys:
                    deps = tuple(Deployment(provider=provider, model=model, api_key=k)  # type: ignore[arg-type]
                                 for k in keys)
                    return Route(model, deps)
        if self._cfg.demo:
            return Route(model, (Deployment(provider="mock", model=model,
                                            base_url=self._cfg.provider("mock").base_url
                                            or DEMO_BASE_URL),))
        return None

    def named_models(self) -> list[str]:
        return list(self._named)

    def base_url(self, dep: Deployment) -> str:
        creds = self._cfg.provider(dep.provider)
        return (dep.base_url or creds.base_url or DEFAULT_BASE_URLS[dep.provider]).rstrip("/")

    def transport(self, dep: Deployment) -> str:
        return dep.transport or self._cfg.server.upstream_transport

    def api_key(self, dep: Deployment) -> str | None:
        if dep.api_key:
            return dep.api_key
        keys = self._cfg.provider(dep.provider).keys()
        return keys[0] if keys else None

    # -- picking ------------------------------------------------------------------
    def health_of(self, route: Route, index: int) -> DeploymentHealth:
        hit = self._health_at.get((id(route), index))
        if hit is not None and hit[0] is route:
            return hit[1]
        dep = route.deployments[index]
        key = deployment_id(route.name, index, dep)
        h = self.health.get(key)
        if h is None:
            h = self.health[key] = DeploymentHealth(key, route.cooldown_s)
        if len(self._health_at) >= 20_000:  # routes of unknown models come and go
            self._health_at.clear()
        self._health_at[(id(route), index)] = (route, h)
        return h

    def pick(self, route: Route, now: float, rng: random.Random,
             exclude: set[int]) -> int | None:
        """Index of the deployment to try next, or None if none is available."""
        if len(route.deployments) == 1:  # nothing to weigh
            if 0 in exclude or not self.health_of(route, 0).available(now):
                return None
            return 0
        best, best_score = None, -1.0
        for i, dep in enumerate(route.deployments):
            if i in exclude:
                continue
            h = self.health_of(route, i)
            if not h.available(now):
                continue
            score = rng.random() ** (1.0 / dep.weight) / (1 + h.in_flight)
            if score > best_score:
                best, best_score = i, score
        return best

    def last_resort(self, route: Route, exclude: set[int]) -> int | None:
        """The open deployment whose cooldown ends first (used when nothing is left)."""
        options = [(self.health_of(route, i).open_until or 0.0, i)
                   for i in range(len(route.deployments)) if i not in exclude]
        return min(options)[1] if options else None

    def started(self, route: Route, index: int, now: float) -> DeploymentHealth:
        h = self.health_of(route, index)
        h.in_flight += 1
        h.requests_total += 1
        if h.open_until is not None and h.state(now) == "half_open":
            h.probing = True
        return h

    @staticmethod
    def succeeded(h: DeploymentHealth, route: Route) -> None:
        h.failures = 0
        h.open_until = None
        h.probing = False
        h.cooldown_s = route.cooldown_s

    @staticmethod
    def failed(h: DeploymentHealth, route: Route, now: float) -> None:
        h.failures += 1
        h.failures_total += 1
        if h.probing:
            h.probing = False
            h.cooldown_s = min(h.cooldown_s * 2, route.cooldown_s * MAX_COOLDOWN_FACTOR)
            h.open_until = now + h.cooldown_s
            h.opened_total += 1
        elif h.failures >= route.failure_threshold and h.open_until is None:
            h.open_until = now + h.cooldown_s
            h.opened_total += 1

    @staticmethod
    def finished(h: DeploymentHealth) -> None:
        h.in_flight -= 1
        # A probe that ended without a verdict (its client went away) frees the slot
        # for the next probe.
        h.probing = False


def clamp_timeout(configured_s: float, requested: bytes | None) -> float:
    """A client may lower a timeout (``x-gateway-timeout`` or the SDKs'
    ``x-stainless-timeout``, in seconds), never raise it."""
    if requested:
        try:
            value = float(requested)
        except ValueError:
            return configured_s
        if 0 < value < configured_s:
            return value
    return configured_s
