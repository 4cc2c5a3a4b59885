"""SDK clients made by a test are closed when it ends (see the autouse fixture in
tests/conftest.py), so no socket is left for the garbage collector to warn about."""
from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")
OPEN: list[Any] = []


def track(client: T) -> T:
    OPEN.append(client)
    return client


def close_all() -> None:
    while OPEN:
        OPEN.pop().close()
