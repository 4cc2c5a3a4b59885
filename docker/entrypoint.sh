#!/bin/sh
# gwcore container entrypoint.
#
#   1. GATEWAY_CONFIG=/etc/gwcore/gateway.yaml when that file exists and GATEWAY_CONFIG
#      is unset;
#   2. `gwcore check-config`: a bad config or a placeholder secret (docker/.env.example's
#      change-me-... values) stops here at once with exit 2, before any waiting;
#   3. waits until the host:port of REDIS_URL and DATABASE_URL (when set) accept TCP
#      connections, at most WAIT_TIMEOUT_S seconds (default 60) in all, else exit 1
#      naming what was unreachable;
#   4. `gwcore migrate` (retried for up to WAIT_TIMEOUT_S more while the database is
#      still starting up behind its open port).  Safe when several replicas start at once: the migration runs under a
#      Postgres advisory lock, so one replica applies it and the others find it done.
#      GWCORE_MIGRATE=0 skips it (e.g. when a Kubernetes Job migrates);
#   5. `exec gwcore serve "$@"`: the gateway replaces this shell (same PID), so SIGTERM
#      reaches it and it drains within server.shutdown_grace_s.
#
# The arguments are `gwcore serve` options (`--demo`, `--workers 4`, ...).  A first
# argument naming another gwcore command (keys, migrate, check-config, version) runs that
# command instead, after the wait, e.g. `docker compose run --rm gateway keys list`.
#
# Overridable for tests and other layouts: GWCORE (the gwcore command, split on spaces:
# default "gwcore"), PYTHON (default "python3"), GWCORE_CONFIG_DIR (default /etc/gwcore).
set -eu

GWCORE=${GWCORE:-gwcore}
PYTHON=${PYTHON:-python3}
GWCORE_CONFIG_DIR=${GWCORE_CONFIG_DIR:-/etc/gwcore}
WAIT_TIMEOUT_S=${WAIT_TIMEOUT_S:-60}

log() { echo "gwcore-entrypoint: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Until the exec, this shell is the container's PID 1, which the kernel gives no default
# signal actions: without a trap, `docker stop` during the wait would only end in a
# SIGKILL 10 s later.  Long steps run in the background with `wait`, which a trapped
# signal interrupts at once.
child=
on_signal() {
    log "$1 received before the gateway started; stopping"
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
    exit "$2"
}
trap 'on_signal SIGTERM 143' TERM
trap 'on_signal SIGINT 130' INT

case $WAIT_TIMEOUT_S in
    '' | *[!0-9]*) die "WAIT_TIMEOUT_S must be a whole number of seconds, got '$WAIT_TIMEOUT_S'" ;;
esac

if [ -z "${GATEWAY_CONFIG:-}" ] && [ -f "$GWCORE_CONFIG_DIR/gateway.yaml" ]; then
    GATEWAY_CONFIG=$GWCORE_CONFIG_DIR/gateway.yaml
    export GATEWAY_CONFIG
    log "using $GATEWAY_CONFIG"
fi

command=serve
case ${1:-} in
    serve) shift ;;
    keys | migrate | check-config | version) command=$1; shift ;;
esac

# --config PATH / --config=PATH among the arguments also applies to check-config and migrate.
config_arg=
prev=
for arg in "$@"; do
    case $prev in --config) config_arg="--config=$arg" ;; esac
    case $arg in --config=*) config_arg=$arg ;; esac
    prev=$arg
done

# 2. Config first: no point waiting for a database with a config that cannot start.
if [ "$command" = serve ]; then
    # shellcheck disable=SC2086  # GWCORE is a command line on purpose
    if $GWCORE check-config $config_arg >/dev/null; then :; else
        status=$?
        log "error: the configuration is invalid (see above); not starting"
        exit "$status"
    fi
fi

# 3. Wait for TCP reachability of every configured server.  Only host and port are ever
#    printed, never the URL (it may hold a password).
"$PYTHON" - <<'EOF' &
import os, re, socket, sys, time
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_PORTS = {"redis": 6379, "rediss": 6379, "postgres": 5432, "postgresql": 5432}
timeout_s = int(os.environ.get("WAIT_TIMEOUT_S", "60"))
deadline = time.time() + timeout_s  # for all servers together


def log(msg):
    print(f"gwcore-entrypoint: {msg}", file=sys.stderr, flush=True)


def split_host_port(item, default_port):
    """'host', 'host:5432', '[::1]:5432' -> (host, port)."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif item.count(":") == 1:
        host, port = item.split(":")
    else:
        host, port = item, ""
    return unquote(host), int(port) if port else default_port


def targets(var, value):
    """[(host, port)] to wait for, any one of which will do; [] when there is nothing
    to wait for over TCP (a unix socket)."""
    value = value.strip()
    if "://" not in value:  # libpq keyword form: host=... port=...
        kv = dict(re.findall(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", value))
        hosts = (kv.get("host") or kv.get("hostaddr") or "localhost").strip("'")
        ports = (kv.get("port") or "5432").strip("'").split(",")
        hosts = hosts.split(",")
        return [(h, int(ports[i] if i < len(ports) else ports[-1]))
                for i, h in enumerate(hosts) if not h.startswith("/")]
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        if scheme != "unix":
            log(f"{var}: scheme {scheme!r} not known, not waiting for it")
        return []
    netloc = parts.netloc.rpartition("@")[2]
    query_host = parse_qs(parts.query).get("host", [""])[0]
    if not netloc:
        if query_host.startswith("/") or not query_host:
            return [] if query_host else [("localhost", DEFAULT_PORTS[scheme])]
        netloc = query_host
    try:
        return [split_host_port(item, DEFAULT_PORTS[scheme])
                for item in netloc.split(",") if item]
    except ValueError:
        log(f"error: {var} has an invalid port")
        sys.exit(1)


def reachable(host, port):
    try:
        left = max(0.2, min(2.0, deadline - time.time()))
        with socket.create_connection((host, port), timeout=left):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


for var, name in (("REDIS_URL", "redis"), ("DATABASE_URL", "postgres")):
    value = os.environ.get(var, "")
    if not value:
        continue
    hosts = targets(var, value)
    if not hosts:
        continue
    where = ", ".join(f"{h}:{p}" for h, p in hosts)
    start = time.time()
    announced = False
    while True:
        errors = [reachable(h, p) for h, p in hosts]
        if None in errors:
            if announced:
                log(f"{name} at {where} is reachable after {time.time() - start:.1f} s")
            break
        if time.time() >= deadline:
            log(f"error: {name} at {where} (from {var}) is not reachable after waiting "
                f"{timeout_s} s (WAIT_TIMEOUT_S): {errors[-1]}. Check that the server is "
                f"up and {var} names the right host and port, or raise WAIT_TIMEOUT_S.")
            sys.exit(1)
        if not announced:
            log(f"waiting for {name} at {where} (from {var}; up to {timeout_s} s): {errors[-1]}")
            announced = True
        time.sleep(min(0.5, max(0.0, deadline - time.time())))
EOF
child=$!
wait "$child" || exit $?
child=

# 4. Migrations.  `gwcore migrate` exits 1 while the database refuses connections
#    (still starting up after its port opened): retried for up to WAIT_TIMEOUT_S more;
#    2 is a config error, not retried.
if [ "$command" = serve ] && [ "${GWCORE_MIGRATE:-1}" != 0 ]; then
    deadline=$(( $(date +%s) + WAIT_TIMEOUT_S ))
    log "running migrations (gwcore migrate)"
    while :; do
        # shellcheck disable=SC2086
        $GWCORE migrate $config_arg &
        child=$!
        if wait "$child"; then
            child=
            break
        else
            status=$?
            child=
        fi
        if [ "$status" -ne 1 ] || [ "$(date +%s)" -ge "$deadline" ]; then
            log "error: gwcore migrate failed (exit $status); not starting"
            exit "$status"
        fi
        log "gwcore migrate failed (exit $status), retrying in 1 s"
        sleep 1
    done
fi

# 5. Become the gateway.
if [ "$command" = serve ]; then
    log "starting: gwcore serve $*"
    # shellcheck disable=SC2086
    exec $GWCORE serve "$@"
fi
# shellcheck disable=SC2086
exec $GWCORE "$command" "$@"
