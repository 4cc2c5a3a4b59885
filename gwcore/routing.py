"""Model name -> deployments.  Pure: no I/O, randomness passed in.

A name declared under ``models:`` routes to its deployments.  Any other name routes by
its prefix (DESIGN.md): ``gpt-*``, ``o1*``, ``o3*``, ``o4*``, ``text-embedding-*`` to
OpenAI, ``claude-*`` to Anthropic, ``gemini-*`` to Google, each only when that
provider's key is set.  With ``--demo`` every other name goes to the ``mock`` provider.

The order deployments are tried in is a weighted random permutation (a weight-3
deployment is first three times as often as a weight-1 one); retries walk that order.
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


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    deployments: tuple[Deployment, ...]
    fallbacks: tuple[str, ...] = ()
    timeout_s: float = 600.0
    retries: int = 2


class Router:
    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self.demo = cfg.demo
        self._named = {m.name: Route(m.name, tuple(m.deployments), tuple(m.fallbacks),
                                     m.timeout_s, m.retries) for m in cfg.models}
        self._implicit: dict[str, Route | None] = {}

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
            if model.startswith(prefix) and self._cfg.provider(provider).api_key:
                return Route(model, (Deployment(provider=provider, model=model),))
        if self._cfg.demo:
            return Route(model, (Deployment(provider="mock", model=model,
                                            base_url=self._cfg.provider("mock").base_url
                                            or DEMO_BASE_URL),))
        return None

    def named_models(self) -> list[str]:
        return list(self._named)

    def implicit_providers(self) -> list[str]:
        """Providers reachable by prefix (their key is set), in a stable order."""
        return [p for p in ("openai", "anthropic", "google") if self._cfg.provider(p).api_key]

    def base_url(self, dep: Deployment) -> str:
        creds = self._cfg.provider(dep.provider)
        return (dep.base_url or creds.base_url or DEFAULT_BASE_URLS[dep.provider]).rstrip("/")

    def api_key(self, dep: Deployment) -> str | None:
        return dep.api_key or self._cfg.provider(dep.provider).api_key


def attempt_order(route: Route, rng: random.Random) -> list[Deployment]:
    """Deployments in a weighted random order (Efraimidis-Spirakis keys)."""
    deps = route.deployments
    if len(deps) == 1:
        return [deps[0]]
    keyed = sorted(deps, key=lambda d: rng.random() ** (1.0 / d.weight), reverse=True)
    return keyed
