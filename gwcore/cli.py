"""Command line: serve, check-config, version.  Parsing and exit codes only."""
from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gwcore", description="A self-hosted AI API gateway.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML config file (default: $GATEWAY_CONFIG or "
                                        "config/gateway.yaml if present)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")
    serve.add_argument("--demo", action="store_true",
                       help="answer every model with the built-in mock provider")
    serve.add_argument("--no-auth", action="store_true",
                       help="allow an open gateway (no keys) on a non-loopback address")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    check = sub.add_parser("check-config", help="validate and print the effective config")
    check.add_argument("--config", help="YAML config file")
    sub.add_parser("version", help="print versions and which native modules are active")
    mig = sub.add_parser("migrate", help="create or upgrade the database schema, then exit")
    mig.add_argument("--config", help="YAML config file")
    keys = sub.add_parser("keys", help="manage gateway keys in the configured store")
    keys.add_argument("--config", help="YAML config file")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="create a key and print it (shown only this once)")
    create.add_argument("--name", required=True)
    create.add_argument("--models", help="comma-separated model names it may call (default all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--max-concurrency", type=int, help="requests in flight")
    create.add_argument("--budget-usd", type=float, help="spend limit in USD")
    lst = ksub.add_parser("list", help="list keys (never the keys themselves)")
    lst.add_argument("--json", action="store_true", help="JSON instead of a table")
    revoke = ksub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"server.host": getattr(args, "host", None), "server.port": getattr(args, "port", None),
            "server.workers": getattr(args, "workers", None),
            "demo": True if getattr(args, "demo", False) else None,
            "no_auth": True if getattr(args, "no_auth", False) else None}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        return _version()
    from gwcore.config import ConfigError, load_config, masked

    try:
        cfg = load_config(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"gwcore: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        sys.stdout.write(orjson.dumps(masked(cfg), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if args.command == "keys":
        return _keys(cfg, args)
    if args.command == "migrate":
        return _migrate(cfg)
    return _serve(cfg, args)


def _migrate(cfg: Any) -> int:
    """Apply pending schema migrations (idempotent; safe when several run at once)."""
    import trio

    from gwcore.stores.factory import make_sql_store

    async def run() -> list[int]:
        store = make_sql_store(cfg)
        try:
            return await store.migrate()
        finally:
            await store.close()

    try:
        applied = trio.run(run)
    except Exception as exc:  # noqa: BLE001 - any driver error is reported and exits 1
        print(f"gwcore: migration failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    target = "postgres" if cfg.database_url else cfg.storage.sqlite_path
    print(f"migrations applied to {target}: {applied or 'none (up to date)'}")
    return 0


def _keys(cfg: Any, args: argparse.Namespace) -> int:
    """The CLI twin of /admin/keys, against the configured store."""
    import trio

    from gwcore.errors import GatewayError
    from gwcore.keys import KeyParams, check_params, new_key, show
    from gwcore.stores.factory import open_sql_store

    async def run() -> int:
        async with open_sql_store(cfg) as store:
            if args.keys_command == "create":
                params = KeyParams(name=args.name,
                                   models=[m.strip() for m in args.models.split(",") if m.strip()]
                                   if args.models else None,
                                   rpm=args.rpm, tpm=args.tpm,
                                   max_concurrency=args.max_concurrency,
                                   budget_usd=args.budget_usd)
                check_params(params, creating=True)
                record, secret = new_key(params)
                await store.create_key(record)
                print(secret)
                print(f"created {record.id} ({record.name}); the key is shown only once",
                      file=sys.stderr)
                return 0
            if args.keys_command == "list":
                records = [show(r) for r in await store.list_keys()]
                if args.json:
                    print(orjson.dumps(records, option=orjson.OPT_INDENT_2).decode())
                    return 0
                print(f"{'id':22} {'name':20} {'prefix':8} {'budget':>10} {'spent':>12} state")
                for r in records:
                    budget = "-" if r["budget_usd"] is None else f"{r['budget_usd']:.2f}"
                    print(f"{r['id']:22} {r['name'][:20]:20} {r['prefix']:8} {budget:>10} "
                          f"{r['spent_usd']:>12.6f} {'revoked' if r['revoked'] else 'active'}")
                return 0
            import time as _time

            if not await store.revoke(args.id, _time.time()):
                print(f"gwcore: no key with id {args.id}", file=sys.stderr)
                return 1
            print(f"revoked {args.id}")
            return 0

    try:
        return trio.run(run)
    except GatewayError as exc:
        print(f"gwcore: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG


def _serve(cfg: Any, args: argparse.Namespace) -> int:
    import trio

    from gwcore.app import App, check_bind_safety, run_until_signal
    from gwcore.config import ConfigError

    if cfg.server.workers > 1 and not args.worker:
        from gwcore.supervisor import Supervisor

        try:
            check_bind_safety(cfg)
        except ConfigError as exc:
            print(f"gwcore: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        passthrough = [a for flag, a in (("config", args.config and f"--config={args.config}"),
                                         ("demo", args.demo and "--demo"),
                                         ("no_auth", args.no_auth and "--no-auth")) if a]
        try:
            return Supervisor(passthrough, cfg.server.host, cfg.server.port,
                              cfg.server.workers, cfg.server.shutdown_grace_s).run()
        except OSError as exc:
            print(f"gwcore: cannot listen on {cfg.server.host}:{cfg.server.port}: "
                  f"{exc.strerror}", file=sys.stderr)
            return 1
    try:
        app = App(cfg)
    except ConfigError as exc:
        print(f"gwcore: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    raise_nofile_limit()
    tune_gc()
    try:
        trio.run(run_until_signal, app)
    except OSError as exc:
        print(f"gwcore: cannot listen on {cfg.server.host}:{cfg.server.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0


# The cyclic collector's first generation runs every GC_GEN0_THRESHOLD net allocations
# (CPython's default: 700).  A request allocates hundreds of objects, nearly all freed
# by reference counting, so the default collects every few requests for little.  Much
# higher (50,000 was tried) lets cyclic garbage (httpx makes plenty) hold megabytes.
GC_GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Move what start-up built out of the collector's sight (``gc.freeze``: it lives
    as long as the process) and collect the young generation less often."""
    import gc

    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def raise_nofile_limit() -> int:
    """Lift the soft open-file limit to the hard one: every client connection and every
    open upstream stream is a descriptor, and the usual soft default (1024) would cap a
    worker far below ``server.max_connections``.  Returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # a container may forbid it
            print(f"gwcore: keeping the open-file limit at {soft}: {exc}", file=sys.stderr)
    return soft


def _version() -> int:
    import platform

    import gwnative
    from gwcore import __version__

    print(f"gwcore {__version__}")
    print(f"python {platform.python_version()} ({platform.python_implementation()})")
    print(f"gwnative: {gwnative.ACTIVE}" + (" (GWNATIVE_PURE set)" if gwnative.PURE else ""))
    for name, impl in gwnative.MODULES.items():
        print(f"  {name}: {impl}")
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("trio", "h11", "httpx", "orjson", "msgspec"):
        try:
            print(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            print(f"{dist} (not installed)")
    return 0
