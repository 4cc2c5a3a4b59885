"""Fixtures and helpers for the reliability tests: the upstream transport parameter,
raw calls that keep every byte of an answer, and process introspection (fds, RSS,
sockets) through /proc."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from tests.support.pg import postgres_server  # noqa: F401  (session fixture)
from tests.support.redis import redis_server  # noqa: F401  (session fixture)

MESSAGES = [{"role": "user", "content": "Say hello to the reliability tests."}]


@pytest.fixture(params=["native", "httpx"])
def transport(request: pytest.FixtureRequest) -> str:
    """The upstream transport every deployment of a test's config uses
    (``Deployment.transport``): the same behaviour is expected from both."""
    return request.param


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    raw: bytes
    events: list[str] = field(default_factory=list)  # SSE data fields, in order

    def json(self) -> Any:
        return orjson.loads(self.raw)

    @property
    def error(self) -> dict[str, Any]:
        return self.json()["error"]


def sse_data(raw: bytes) -> list[str]:
    """The data of every event of an SSE body (comments and other fields dropped)."""
    out = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [ln[5:].lstrip(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
        if lines:
            out.append(b"\n".join(lines).decode("utf-8", "replace"))
    return out


async def chat(h: httpx.AsyncClient, url: str, key: str, model: str, *, stream: bool = False,
               path: str = "/v1/chat/completions", headers: dict[str, str] | None = None,
               body: dict[str, Any] | None = None) -> Answer:
    """One chat call; a stream is read to its end (a silent truncation raises here)."""
    payload = body or {"model": model, "messages": MESSAGES, "stream": stream}
    hdrs = {"authorization": f"Bearer {key}", **(headers or {})}
    if stream:
        async with h.stream("POST", url + path, json=payload, headers=hdrs) as r:
            raw = await r.aread()
        answer = Answer(r.status_code, r.headers, raw)
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            answer.events = sse_data(raw)
        return answer
    r = await h.post(url + path, json=payload, headers=hdrs)
    return Answer(r.status_code, r.headers, r.content)


# -- /proc ----------------------------------------------------------------------------


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def socket_inodes(pid: int | str = "self") -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def tcp_sockets_to(ports: set[int], pid: int | str = "self") -> int:
    """Open TCP sockets of the process connected to one of ``ports`` on loopback
    (TIME_WAIT entries own no fd, so they are not counted)."""
    inodes = socket_inodes(pid)
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            remote_port = int(cols[2].rsplit(":", 1)[1], 16)
            if remote_port in ports and cols[9] in inodes:
                n += 1
    return n
