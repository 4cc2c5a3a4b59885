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
    return _serve(cfg, args)


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
    try:
        trio.run(run_until_signal, app)
    except OSError as exc:
        print(f"gwcore: cannot listen on {cfg.server.host}:{cfg.server.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    return 0


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
