"""Composition root: config -> upstream clients -> pipeline -> server, in one nursery."""
from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import trio

import gwnative
from gwcore import __version__
from gwcore.accesslog import AccessLog, event
from gwcore.api.routes import Gateway, render_protocol_error
from gwcore.auth import Authenticator
from gwcore.config import Config, ConfigError, is_loopback
from gwcore.accounting import PriceTable
from gwcore.cache import ResponseCache
from gwcore.metrics import Metrics, health_rows
from gwcore.pipeline import Pipeline
from gwcore.ratelimit import RateLimiter
from gwcore.routing import Router
from gwcore.server.connection import ServerLimits
from gwcore.server.listener import Server, open_listeners
from gwcore.stores.factory import open_sql_store
from gwcore.stores.redis import maybe_open_redis
from gwcore.upstream import Upstreams


def check_bind_safety(cfg: Config) -> None:
    """Refuse an open gateway on a non-loopback address unless --no-auth was given."""
    has_keys = bool(cfg.api_keys or cfg.keys or cfg.master_key)
    if not has_keys and not cfg.no_auth and not is_loopback(cfg.server.host):
        raise ConfigError([
            f"server.host: refusing to listen on {cfg.server.host} with no gateway keys "
            "configured; set GATEWAY_API_KEYS or GATEWAY_MASTER_KEY, or pass --no-auth "
            "to run an open gateway on purpose"])


class App:
    def __init__(self, cfg: Config, *, access_log: AccessLog | None = None) -> None:
        check_bind_safety(cfg)
        self.cfg = cfg
        self.access_log = access_log or AccessLog(enabled=cfg.log.access_log)
        self._stop = trio.Event()
        self.server: Server | None = None
        self.gateway: Gateway | None = None
        self.ports: list[int] = []

    def shutdown(self) -> None:
        """Begin a graceful drain (what SIGTERM/SIGINT do)."""
        self._stop.set()

    async def serve(self, listeners: list[trio.SocketListener] | None = None, *,
                    task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        s = cfg.server
        limits = ServerLimits(max_header_bytes=s.max_header_bytes,
                              max_body_bytes=s.max_body_bytes,
                              header_timeout_s=s.header_timeout_s,
                              body_timeout_s=s.body_timeout_s,
                              keepalive_timeout_s=s.keepalive_timeout_s,
                              send_timeout_s=s.send_timeout_s)
        async with Upstreams(max_connections=s.upstream_max_connections,
                             keepalive=s.upstream_max_idle) as upstreams, open_sql_store(cfg) as store, \
                maybe_open_redis(cfg.redis_url) as redis:
            router = Router(cfg)
            pipeline = Pipeline(router, upstreams, stream_keepalive_s=s.stream_keepalive_s)
            auth = Authenticator(cfg, store=store, spend=store.spend_pico)
            if any(r.revoked_at is None for r in await store.list_keys()):
                auth.require_keys()

            async def ready() -> dict[str, str]:
                # "degraded": working on a fallback (the audit spool, local limits); still
                # ready, so an outage does not pull every instance out of the balancer.
                db = "ok" if store.statistics().get("db_ok", True) else "degraded"
                checks = {"server": "draining" if server.draining else "ok", "database": db}
                if redis is not None:
                    checks["redis"] = limiter.ready_state()
                return checks

            limiter = RateLimiter(cfg, redis=redis)
            cache = ResponseCache(cfg.cache, redis=redis)
            metrics = Metrics()
            metrics.health = health_rows(router)
            gateway = Gateway(pipeline, auth, self.access_log, limiter, cache, metrics,
                              prices=PriceTable(cfg.prices), ready=ready)
            gateway.metrics_require_key = cfg.metrics.require_key
            self.gateway = gateway
            gateway.key_store = store
            gateway.audit = store
            gateway.audit_enabled = cfg.storage.audit
            server = Server(gateway, limits, max_connections=s.max_connections,
                            render_error=render_protocol_error)
            self.server = server
            metrics.sources += [server.statistics, limiter.statistics, cache.statistics,
                                upstreams.statistics, auth.statistics, _numbers(store.statistics)]
            async with trio.open_nursery() as audit_nursery:
                # The audit writer outlives the server's drain: it is cancelled (and
                # flushes to the database or the spool) only after the last request.
                audit_nursery.start_soon(store.run)
                await self._serve(cfg, server, listeners, auth, limiter, upstreams,
                                  task_status)
                audit_nursery.cancel_scope.cancel()
        event("stopped")

    async def _serve(self, cfg: Config, server: Server, listeners: list[trio.SocketListener] | None,
                     auth: Authenticator, limiter: RateLimiter, upstreams: Upstreams,
                     task_status: trio.TaskStatus[list[int]]) -> None:
        s = cfg.server
        if listeners is None:
            listeners = await open_listeners(s.host, s.port, reuse_port=s.workers > 1)
        self.ports = [lst.socket.getsockname()[1] for lst in listeners]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.access_log.run)
            nursery.start_soon(upstreams.native.run)  # whole answers' deadlines
            nursery.start_soon(_evict_idle_buckets, limiter)
            nursery.start_soon(limiter.run)
            await nursery.start(server.serve, listeners)
            event("listening", host=s.host, ports=self.ports, version=__version__,
                  native=gwnative.ACTIVE, demo=cfg.demo, auth=auth.enabled)
            task_status.started(self.ports)
            await self._stop.wait()
            event("draining", grace_s=s.shutdown_grace_s, connections=len(server.connections))
            await server.drain(s.shutdown_grace_s)
            nursery.cancel_scope.cancel()


def _numbers(stats: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Only the numeric (and boolean) entries of a statistics() dict, for /metrics."""
    def numbers() -> dict[str, Any]:
        return {f"store_{k}": v for k, v in stats().items() if isinstance(v, int | float | bool)}
    return numbers


# Full buckets are dropped once a minute: they equal absent ones, so memory follows the
# keys active in the last window, not every key ever seen.
EVICT_EVERY_S = 60.0


async def _evict_idle_buckets(limiter: RateLimiter) -> None:
    while True:
        await trio.sleep(EVICT_EVERY_S)
        limiter.evict_idle(trio.current_time())


async def run_until_signal(app: App) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return (exit code 0)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.serve)

            async def on_signal() -> None:
                async for signum in signals:
                    event("signal", signal=signal.Signals(signum).name)
                    app.shutdown()
                    return

            nursery.start_soon(on_signal)
            await app._stop.wait()
