"""Fixtures over both implementations of each gwnative module: ids ``c`` and ``py``.

The twins are imported directly (``gwnative._sse_c``, ``gwnative._sse_py``...), not through
``gwnative``, so the parity tests compare both even when ``GWNATIVE_PURE=1`` makes the
package itself run the twins.

A compiled module that cannot be imported fails its ``c`` tests loudly, because a silently
skipped build would hide a broken one; only with ``GWNATIVE_PURE`` set is it skipped.

The fixtures are session-scoped: function-scoped fixtures do not mix with ``@given``.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

PURE = bool(os.environ.get("GWNATIVE_PURE"))
IMPLS = ["c", "py"]


def load_twin(name: str, impl: str) -> ModuleType:
    """``gwnative._<name>_c`` or ``gwnative._<name>_py``."""
    if impl == "py":
        return importlib.import_module(f"gwnative._{name}_py")
    try:
        return importlib.import_module(f"gwnative._{name}_c")
    except ImportError as exc:
        if PURE:
            pytest.skip(f"gwnative._{name}_c is not built and GWNATIVE_PURE is set")
        pytest.fail(
            f"gwnative._{name}_c cannot be imported ({exc}). Build it with "
            "`python setup.py build_ext --inplace`, or set GWNATIVE_PURE=1 to test the "
            "pure twins only.",
            pytrace=False,
        )


@pytest.fixture(scope="session", params=IMPLS)
def sse_impl(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin("sse", request.param)


@pytest.fixture(scope="session", params=IMPLS)
def buckets_impl(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin("buckets", request.param)


@pytest.fixture(scope="session", params=IMPLS)
def cachekey_impl(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin("cachekey", request.param)
