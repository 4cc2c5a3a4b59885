#!/usr/bin/env python3
"""The gateway's throughput with its stores: none, the embedded defaults, Redis + Postgres.

    python benchmarks/stores.py [--duration 5] [--connections 1,32]

Starts a real redis-server and a real Postgres (as the tests do: free ports, temp dirs,
Postgres as the `postgres` user when run as root), then runs `benchmarks/load.py --spawn`
three times, one after the other, each with a fresh gateway:

- bare: no rate limit, no audit log (`limits.default.requests: null`, `storage.audit: false`);
- embedded: the defaults, an in-process rate limit and the SQLite audit log;
- redis+postgres: `REDIS_URL` (global limits, leased) and `DATABASE_URL` (COPY audit log).

The rate limit is set high enough never to deny (1e9 per second), so what is measured is
its cost, not its effect.  Prints one table; the figures of one run compare.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.pg import PostgresServer, find_pg_bin  # noqa: E402
from tests.support.procs import free_port  # noqa: E402
from tests.support.redis import RedisServer  # noqa: E402

def setup(name: str, tmp: str, redis_url: str, dsn: str) -> tuple[str, dict[str, str]]:
    """(gateway.yaml, environment) of one setup.  load.py --spawn sets a huge
    RATE_LIMIT_REQUESTS itself; the bare setup blanks it, so no limit applies."""
    storage = f"storage: {{sqlite_path: '{tmp}/gw.db', spool_dir: '{tmp}/spool'"
    if name == "bare":
        return storage + ", audit: false}\n", {"RATE_LIMIT_REQUESTS": ""}
    if name == "embedded":
        return storage + "}\n", {}
    return storage + "}\n", {"REDIS_URL": redis_url, "DATABASE_URL": dsn}


SETUPS = ("bare", "embedded", "redis+postgres")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", default="1,32")
    args = p.parse_args(argv)
    bin_dir = find_pg_bin()
    if bin_dir is None:
        print("stores.py: PostgreSQL binaries not found (apt-get install postgresql)", file=sys.stderr)
        return 2
    pg = PostgresServer(bin_dir)
    pg.init()
    pg.start()
    redis = RedisServer(free_port())
    redis.start()
    results = {}
    try:
        dsn = pg.dsn(pg.create_database())
        for name in SETUPS:
            with tempfile.TemporaryDirectory() as tmp:
                yaml_text, env = setup(name, tmp, redis.url, dsn)
                cfg = Path(tmp) / "gateway.yaml"
                cfg.write_text(yaml_text)
                out = Path(tmp) / "run.json"
                cmd = [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--spawn",
                       "--duration", str(args.duration), "--connections", args.connections,
                       "--json", str(out), "--gateway-env", f"GATEWAY_CONFIG={cfg}"]
                for var, value in env.items():
                    cmd += ["--gateway-env", f"{var}={value}"]
                run = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
                if run.returncode != 0:
                    print(f"stores.py: {name}: load.py failed:\n{run.stdout}\n{run.stderr}", file=sys.stderr)
                    return 2
                results[name] = json.loads(out.read_text())
    finally:
        redis.stop()
        pg.close()
    print(f"## Gateway throughput with its stores ({args.duration:g} s per point, one run)\n")
    print("| setup | conns | req/s | p50 ms | p99 ms | vs bare |")
    print("|---|---:|---:|---:|---:|---:|")
    bare = {r["connections"]: r["rps"] for r in _target_runs(results["bare"])}
    for name, data in results.items():
        for r in _target_runs(data):
            ratio = r["rps"] / bare[r["connections"]] if bare.get(r["connections"]) else 0
            print(f"| {name} | {r['connections']} | {r['rps']:,.0f} | {r['p50_ms']:.3f} | "
                  f"{r['p99_ms']:.3f} | {ratio:.2f} |")
    return 0


def _target_runs(data: dict) -> list[dict]:
    return [r for r in data["runs"] if r["label"] == "target"]


if __name__ == "__main__":
    raise SystemExit(main())
