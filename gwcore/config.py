"""Configuration: environment + ``.env`` + the YAML file, decoded into msgspec structs.

How this works: the YAML file is read and ``${VAR}`` / ``${VAR:-default}`` are replaced
from the environment.  Environment variables from DESIGN.md are then laid over the
file's values (the environment wins over the file; a ``.env`` file in the working
directory fills in variables the environment lacks).  The merged raw tree is checked
against the struct types by ``_collect_errors`` so that *every* error is reported, each
with its path (``models[0].deployments[1].weight``) or the variable it came from, and
only then converted; cross-field checks (duplicate names, ports, placeholder secrets)
run on the converted config, so they are reported once the shapes are right.  The
gateway never starts half-configured: ``load_config`` either
returns a frozen ``Config`` or raises ``ConfigError`` listing everything wrong.
"""
from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

PROVIDERS = ("openai", "anthropic", "google", "mock")

# Default upstream bases (DESIGN.md): OpenAI's includes the /v1 prefix, the others not.
DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "google": "https://generativelanguage.googleapis.com",
    "mock": "mock://",
}

# Placeholder secrets shipped in docker/.env.example: refusing them keeps an example
# file from ever becoming a production secret.
PLACEHOLDER_MARKERS = ("change-me", "changeme", "replace-me", "placeholder")


class ConfigError(Exception):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {e}" for e in errors))


class _Base(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class Deployment(_Base):
    provider: Literal["openai", "anthropic", "google", "mock"]
    model: str
    api_key: str | None = None
    base_url: str | None = None
    weight: float = 1.0
    timeout_s: float | None = None
    # "native" or "httpx" (see ServerConfig.upstream_transport); None: the server's.
    transport: Literal["native", "httpx"] | None = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError("weight must be > 0")


class ModelRoute(_Base):
    name: str
    deployments: list[Deployment]
    fallbacks: list[str] = []
    # Fallbacks also on a context-window error (the prompt is too long for this model).
    fallback_on_context_window: bool = False
    timeout_s: float = 600.0          # total, per attempt
    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float | None = None  # until the response head; None: timeout_s
    retries: int = 2
    # Circuit breaker: this many failures in a row cool a deployment down for
    # cooldown_s (doubling while its probes keep failing, up to 10x).
    failure_threshold: int = 3
    cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.deployments:
            raise ValueError("deployments must not be empty")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")


class LimitSpec(_Base):
    requests: int | None = None
    window_s: float = 3600.0
    tokens_per_minute: int | None = None
    max_concurrency: int | None = None


class Limits(_Base):
    # Per gateway key (each key has its own buckets).
    default: LimitSpec = LimitSpec(requests=1000, window_s=3600.0)
    # Per model name, shared by every key that calls it.
    models: dict[str, LimitSpec] = {}
    # With REDIS_URL: what to do while Redis is down ("open": local buckets with 1/N of
    # each limit; "closed": 503), and N (0: the workers last seen in Redis, else
    # server.workers).
    redis_fail: Literal["open", "closed"] = "open"
    instances: int = 0
    redis_prefix: str = "gw:rl:"


class CacheConfig(_Base):
    enabled: bool = False
    ttl_s: float = 3600.0
    max_entries: int = 10_000          # the in-process LRU's bound
    scope: Literal["key", "shared"] = "key"
    max_value_bytes: int = 1_048_576   # answers larger than this are not stored in Redis
    redis_prefix: str = "gw:c:"


class StaticKey(_Base):
    key: str
    name: str
    models: list[str] | None = None
    budget_usd: float | None = None
    rpm: int | None = None            # requests per minute, instead of limits.default
    tpm: int | None = None            # tokens per minute, instead of limits.default
    max_concurrency: int | None = None


class Price(_Base):
    """USD per million tokens."""
    input: float
    output: float
    cached_input: float | None = None   # prompt-cache reads; default: input
    cache_write: float | None = None    # prompt-cache writes (Anthropic); default: input


class ProviderCreds(_Base):
    api_key: str | None = None
    # Several keys of one provider are load-balanced like deployments (the env
    # variable may hold them comma-separated).
    api_keys: list[str] = []
    base_url: str | None = None

    def keys(self) -> list[str]:
        out = list(self.api_keys)
        if self.api_key:
            out += [k.strip() for k in self.api_key.split(",") if k.strip() and k.strip() not in out]
        return out


class ServerConfig(_Base):
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    # 64 KiB: DESIGN.md's header block limit (431 above it).
    max_header_bytes: int = 64 * 1024
    # 10 MiB: DESIGN.md's default body limit (413 above it).
    max_body_bytes: int = 10 * 1024 * 1024
    # 10 s: DESIGN.md; a client that has not sent its whole head by then is dropped.
    header_timeout_s: float = 10.0
    # 60 s for the whole request body once the head is in.
    body_timeout_s: float = 60.0
    # 75 s: above the 60 s idle timeout of common load balancers (AWS ALB, nginx), so
    # the balancer, not the gateway, closes idle keep-alive connections first.
    keepalive_timeout_s: float = 75.0
    # 60 s (nginx's send_timeout): a client that reads nothing of its answer for this
    # long is dropped, so a stalled reader cannot hold a connection and an upstream.
    send_timeout_s: float = 60.0
    max_connections: int = 10_000
    # Grace period for in-flight requests and streams after SIGTERM.
    shutdown_grace_s: float = 30.0
    # SSE comment keepalive (": ping") interval while a stream waits for its first token.
    stream_keepalive_s: float = 15.0
    # The upstream transport of deployments that do not name theirs: "native", the lean
    # trio + h11 keep-alive pool (the fast path), or "httpx", for what native does not
    # do (HTTP/2).  Egress proxies (HTTP(S)_PROXY) are honoured either way: a proxied
    # origin goes through httpx.
    upstream_transport: Literal["native", "httpx"] = "native"
    # Open connections per upstream origin (each open stream holds one); a request
    # beyond it waits, within its connect timeout, for one to come back.
    upstream_max_connections: int = 10_000
    # Idle keep-alive connections kept per upstream origin.
    upstream_max_idle: int = 256


class StorageConfig(_Base):
    # One audit record per request (off: no records, so no usage or budgets either).
    audit: bool = True
    # The embedded default when DATABASE_URL is unset (keys, usage, audit log).
    sqlite_path: str = "data/gateway.db"
    # Audit batches wait here while the database is unreachable.
    spool_dir: str = "data/spool"
    # Audit rows older than this are dropped (whole day partitions on Postgres).
    retention_days: int = 30


class LogConfig(_Base):
    access_log: bool = True
    level: Literal["debug", "info", "warning", "error"] = "info"


class MetricsConfig(_Base):
    require_key: bool = False


class Config(_Base):
    server: ServerConfig = ServerConfig()
    providers: dict[str, ProviderCreds] = {}
    models: list[ModelRoute] = []
    limits: Limits = Limits()
    cache: CacheConfig = CacheConfig()
    keys: list[StaticKey] = []
    prices: dict[str, Price] = {}
    middleware: list[str] = []
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    storage: StorageConfig = StorageConfig()
    master_key: str | None = None
    api_keys: list[str] = []
    redis_url: str | None = None
    database_url: str | None = None
    # Set by the command line, not the file.
    demo: bool = False
    no_auth: bool = False

    def provider(self, name: str) -> ProviderCreds:
        return self.providers.get(name) or ProviderCreds()


# Environment variable -> (path in the raw tree, kind). Kinds convert the string.
ENV_MAP: dict[str, tuple[tuple[str, ...], str]] = {
    "GATEWAY_HOST": (("server", "host"), "str"),
    "GATEWAY_PORT": (("server", "port"), "int"),
    "GATEWAY_WORKERS": (("server", "workers"), "int"),
    "GATEWAY_UPSTREAM_TRANSPORT": (("server", "upstream_transport"), "str"),
    "GATEWAY_MASTER_KEY": (("master_key",), "str"),
    "GATEWAY_API_KEYS": (("api_keys",), "csv"),
    "OPENAI_API_KEY": (("providers", "openai", "api_key"), "str"),
    "OPENAI_BASE_URL": (("providers", "openai", "base_url"), "str"),
    "ANTHROPIC_API_KEY": (("providers", "anthropic", "api_key"), "str"),
    "ANTHROPIC_BASE_URL": (("providers", "anthropic", "base_url"), "str"),
    "GOOGLE_AI_API_KEY": (("providers", "google", "api_key"), "str"),
    "GOOGLE_AI_BASE_URL": (("providers", "google", "base_url"), "str"),
    "REDIS_URL": (("redis_url",), "str"),
    "DATABASE_URL": (("database_url",), "str"),
    "RATE_LIMIT_REQUESTS": (("limits", "default", "requests"), "int"),
    "RATE_LIMIT_WINDOW": (("limits", "default", "window_s"), "float"),
}

SECRET_FIELDS = {"api_key", "key", "master_key", "api_keys"}
_URL_PASSWORD = re.compile(r"(?<=://)([^:/@]*):([^@]+)@")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def read_dotenv(path: Path) -> dict[str, str]:
    """``KEY=value`` lines; ``#`` comments, optional ``export``, single or double quotes."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        name, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[name.strip()] = value
    return out


def effective_env(environ: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, str]:
    env = dict(read_dotenv((cwd or Path.cwd()) / ".env"))
    env.update(os.environ if environ is None else environ)
    return env


def _expand(value: Any, env: dict[str, str], path: str, errors: list[str]) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            errors.append(f"{path}: environment variable {name} is not set")
            return ""
        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, env, _join(path, str(k)), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    return value


def _join(path: str, name: str) -> str:
    if not name:
        return path
    return f"{path}.{name}" if path else name


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _env_value(name: str, raw: str, kind: str, errors: list[str]) -> Any:
    if kind == "str":
        return raw
    if kind == "csv":
        return [p.strip() for p in raw.split(",") if p.strip()]
    try:
        return int(raw) if kind == "int" else float(raw)
    except ValueError:
        expected = "an integer" if kind == "int" else "a number"
        errors.append(f"{name}: expected {expected}, got {raw!r}")
        return None


def _type_name(t: Any) -> str:
    ti = t
    if isinstance(ti, msgspec.inspect.StrType):
        return "a string"
    if isinstance(ti, msgspec.inspect.IntType):
        return "an integer"
    if isinstance(ti, msgspec.inspect.FloatType):
        return "a number"
    if isinstance(ti, msgspec.inspect.BoolType):
        return "true or false"
    if isinstance(ti, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(repr(v) for v in ti.values)
    if isinstance(ti, msgspec.inspect.ListType):
        return "a list"
    if isinstance(ti, (msgspec.inspect.DictType, msgspec.inspect.StructType)):
        return "a mapping"
    if isinstance(ti, msgspec.inspect.UnionType):
        return " or ".join(_type_name(x) for x in ti.types if not isinstance(x, msgspec.inspect.NoneType))
    return str(type(t).__name__)


def _collect_errors(value: Any, t: msgspec.inspect.Type, path: str, errors: list[str]) -> None:
    """Walk the raw tree against the type, recording every mismatch with its path."""
    if isinstance(t, msgspec.inspect.UnionType):
        non_none = [x for x in t.types if not isinstance(x, msgspec.inspect.NoneType)]
        if value is None and len(non_none) < len(t.types):
            return
        if len(non_none) == 1:
            _collect_errors(value, non_none[0], path, errors)
            return
    if isinstance(t, msgspec.inspect.StructType):
        if not isinstance(value, dict):
            errors.append(f"{path or '(top level)'}: expected a mapping, got {_show(value)}")
            return
        names = {f.encode_name: f for f in t.fields}
        before = len(errors)
        for k in value:
            if k not in names:
                errors.append(f"{_join(path, str(k))}: unknown field (expected one of: "
                              + ", ".join(sorted(names)) + ")")
        for f in t.fields:
            if f.encode_name in value:
                _collect_errors(value[f.encode_name], f.type, _join(path, f.encode_name), errors)
            elif f.required:
                errors.append(f"{_join(path, f.encode_name)}: required field is missing")
        if len(errors) == before:
            # The fields are right one by one; this catches the struct's own checks
            # (__post_init__), such as an empty deployment list.
            try:
                msgspec.convert(value, t.cls)
            except msgspec.ValidationError as exc:
                errors.append(_msgspec_error(exc, path))
        return
    if isinstance(t, msgspec.inspect.ListType):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {_show(value)}")
            return
        for i, item in enumerate(value):
            _collect_errors(item, t.item_type, f"{path}[{i}]", errors)
        return
    if isinstance(t, msgspec.inspect.DictType):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {_show(value)}")
            return
        for k, item in value.items():
            _collect_errors(item, t.value_type, _join(path, str(k)), errors)
        return
    try:
        msgspec.convert(value, t.cls if hasattr(t, "cls") else _py_type(t))
    except (msgspec.ValidationError, TypeError):
        errors.append(f"{path}: expected {_type_name(t)}, got {_show(value)}")


def _py_type(t: msgspec.inspect.Type) -> Any:
    if isinstance(t, msgspec.inspect.StrType):
        return str
    if isinstance(t, msgspec.inspect.IntType):
        return int
    if isinstance(t, msgspec.inspect.FloatType):
        return float
    if isinstance(t, msgspec.inspect.BoolType):
        return bool
    if isinstance(t, msgspec.inspect.LiteralType):
        return Literal[tuple(t.values)]  # type: ignore[misc]
    if isinstance(t, msgspec.inspect.UnionType):
        types = tuple(_py_type(x) for x in t.types)
        out = types[0]
        for x in types[1:]:
            out = out | x
        return out
    if isinstance(t, msgspec.inspect.NoneType):
        return type(None)
    return Any


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _post_checks(cfg: Config, errors: list[str]) -> None:
    names = [m.name for m in cfg.models]
    for i, m in enumerate(cfg.models):
        if names.count(m.name) > 1 and names.index(m.name) != i:
            errors.append(f"models[{i}].name: duplicate model name {m.name!r}")
        for j, fb in enumerate(m.fallbacks):
            if fb == m.name:
                errors.append(f"models[{i}].fallbacks[{j}]: a model cannot fall back to itself")
    for name in cfg.providers:
        if name not in PROVIDERS:
            errors.append(f"providers.{name}: unknown provider (expected one of: "
                          + ", ".join(PROVIDERS) + ")")
    s = cfg.server
    if not 0 <= s.port <= 65535:
        errors.append(f"server.port: expected 0..65535, got {s.port}")
    if s.workers < 1:
        errors.append(f"server.workers: expected at least 1, got {s.workers}")
    for field in ("max_header_bytes", "max_body_bytes", "max_connections",
                  "upstream_max_connections"):
        if getattr(s, field) <= 0:
            errors.append(f"server.{field}: expected a positive number")
    for field in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s", "send_timeout_s",
                  "stream_keepalive_s"):
        if not getattr(s, field) > 0:
            errors.append(f"server.{field}: expected a positive number of seconds")
    secrets = [("GATEWAY_MASTER_KEY", cfg.master_key)]
    secrets += [("GATEWAY_API_KEYS", k) for k in cfg.api_keys]
    secrets += [(f"keys[{i}].key", k.key) for i, k in enumerate(cfg.keys)]
    for where, secret in secrets:
        if secret and any(m in secret.lower() for m in PLACEHOLDER_MARKERS):
            errors.append(f"{where}: still holds a placeholder secret; set a real key")
        elif secret is not None and len(secret) < 8:
            errors.append(f"{where}: a gateway key must be at least 8 characters")


def load_config(path: str | Path | None = None, *, environ: dict[str, str] | None = None,
                cwd: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read env + .env + YAML into a Config, or raise ConfigError with every error."""
    env = effective_env(environ, cwd)
    errors: list[str] = []
    raw: dict[str, Any] = {}
    if path is None:
        path = env.get("GATEWAY_CONFIG") or None
        if path is None and ((cwd or Path.cwd()) / "config" / "gateway.yaml").is_file():
            path = (cwd or Path.cwd()) / "config" / "gateway.yaml"
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"{p}: cannot read the config file ({exc.strerror})"]) from exc
        except yaml.YAMLError as exc:
            raise ConfigError([f"{p}: not valid YAML: {exc}"]) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"{p}: expected a mapping at the top level"])
        raw = _expand(loaded, env, "", errors)
    for name, (where, kind) in ENV_MAP.items():
        if env.get(name):
            value = _env_value(name, env[name], kind, errors)
            if value is not None:
                _set_path(raw, where, value)
    for where, value in (overrides or {}).items():
        if value is not None:
            _set_path(raw, tuple(where.split(".")), value)
    type_info = msgspec.inspect.type_info(Config)
    _collect_errors(raw, type_info, "", errors)
    if errors:
        raise ConfigError(errors)
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError([_msgspec_error(exc)]) from exc
    _post_checks(cfg, errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def _msgspec_error(exc: msgspec.ValidationError, base: str = "") -> str:
    msg, _, where = str(exc).partition(" - at `$")
    where = _join(base, where.rstrip("`").lstrip("."))
    return f"{where or '(top level)'}: {msg}"


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mask_secret(value: str) -> str:
    if len(value) <= 8:
        return "****"
    return value[:3] + "..." + value[-2:]


def masked(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data with every secret masked."""
    def walk(node: Any, key: str | None = None) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            if key in SECRET_FIELDS:
                return [mask_secret(v) if isinstance(v, str) else v for v in node]
            return [walk(v) for v in node]
        if isinstance(node, str):
            if key in SECRET_FIELDS:
                return mask_secret(node)
            if key in ("redis_url", "database_url"):
                return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:****@", node)
        return node
    return walk(msgspec.to_builtins(cfg))
