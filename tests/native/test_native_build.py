"""The gateway runs the compiled modules whenever they are built."""
from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

import gwnative


def built_extensions() -> list[Path]:
    here = Path(gwnative.__file__).parent
    return [
        p for suffix in importlib.machinery.EXTENSION_SUFFIXES
        for p in here.glob(f"_*_c{suffix}")
    ]


def test_native_modules_are_compiled_unless_pure() -> None:
    if os.environ.get("GWNATIVE_PURE"):
        assert gwnative.ACTIVE == "pure"
        assert set(gwnative.MODULES.values()) == {"pure"}
        return
    if built_extensions():
        # A partial or broken build (one module falling back to its twin) fails here.
        assert gwnative.ACTIVE == "compiled", gwnative.MODULES


def test_the_package_exports_one_implementation_of_everything() -> None:
    from gwnative import errors

    assert set(gwnative.MODULES) == {"buckets", "cachekey", "sse"}
    impl = {name: gwnative.MODULES[name] for name in gwnative.MODULES}
    suffix = {"compiled": "_c", "pure": "_py"}
    assert gwnative.TokenBuckets.__module__ == f"gwnative._buckets{suffix[impl['buckets']]}"
    assert gwnative.cache_key.__module__ == f"gwnative._cachekey{suffix[impl['cachekey']]}"
    assert gwnative.SSEParser.__module__ == f"gwnative._sse{suffix[impl['sse']]}"
    assert issubclass(errors.SSEError, ValueError)
    assert issubclass(errors.CacheKeyError, ValueError)
    assert gwnative.IGNORED_FIELDS == frozenset(
        {"user", "stream", "stream_options", "metadata", "store", "service_tier"})
