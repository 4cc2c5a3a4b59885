"""The per-request hot path in compiled code, each module with a pure-Python twin.

Every module exists twice with the same API: ``_name_c`` (Cython) and ``_name_py``
(the reference).  The compiled one is used when it was built; ``GWNATIVE_PURE=1``
forces the twins.  ``ACTIVE`` is ``"compiled"`` only when every module is compiled,
and ``MODULES`` says which implementation each module runs.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

PURE = bool(os.environ.get("GWNATIVE_PURE"))

_NAMES = ("buckets", "cachekey", "sse")


def _load(name: str) -> tuple[ModuleType, str]:
    if not PURE:
        try:
            return importlib.import_module(f"gwnative._{name}_c"), "compiled"
        except ImportError:  # not built: run the twin, and say so in MODULES
            pass
    return importlib.import_module(f"gwnative._{name}_py"), "pure"


_buckets, _b = _load("buckets")
_cachekey, _k = _load("cachekey")
_sse, _s = _load("sse")

MODULES: dict[str, str] = {"buckets": _b, "cachekey": _k, "sse": _s}
ACTIVE = "compiled" if all(v == "compiled" for v in MODULES.values()) else "pure"

TokenBuckets = _buckets.TokenBuckets
Decision = _buckets.Decision
cache_key = _cachekey.cache_key
IGNORED_FIELDS = _cachekey.IGNORED_FIELDS
SSEParser = _sse.SSEParser
SSEEvent = _sse.SSEEvent
encode_event = _sse.encode_event
encode_comment = _sse.encode_comment

__all__ = [
    "ACTIVE", "MODULES", "PURE", "TokenBuckets", "Decision", "cache_key",
    "IGNORED_FIELDS", "SSEParser", "SSEEvent", "encode_event", "encode_comment",
]
