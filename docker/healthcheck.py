#!/usr/bin/env python3
"""Container health check (slim images have no curl): GET /healthz on this container.

Exit 0 when the gateway answers 200, else 1 (HEALTHCHECK's contract).  The port is
GATEWAY_PORT (8080 in the image)."""
import os
import sys
import urllib.request

port = os.environ.get("GATEWAY_PORT") or "8080"
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as resp:
        sys.exit(0 if resp.status == 200 else 1)
except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
