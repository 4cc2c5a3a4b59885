"""Only the native build lives here; metadata is in pyproject.toml.

GWNATIVE_PURE=1  builds no extension (the package then runs its pure-Python twins).
GWNATIVE_DEBUG=1 compiles with -O0 -g3 and asserts on.
"""
import os

from setuptools import Extension, setup

MODULES = ["buckets", "cachekey", "sse"]
PURE = bool(os.environ.get("GWNATIVE_PURE"))
DEBUG = bool(os.environ.get("GWNATIVE_DEBUG"))


def extensions() -> list:
    from Cython.Build import cythonize

    # -ffp-contract=off: no fused multiply-add, so the compiled buckets do the same
    # float arithmetic as the pure twin, bit for bit.
    cflags = (["-O0", "-g3", "-UNDEBUG"] if DEBUG else ["-O3"]) + ["-ffp-contract=off"]
    exts = [
        Extension(f"gwnative._{m}_c", [f"gwnative/_{m}_c.pyx"], extra_compile_args=cflags)
        for m in MODULES
        if os.path.exists(f"gwnative/_{m}_c.pyx")
    ]
    return cythonize(
        exts,
        compiler_directives={"language_level": 3, "embedsignature": True},
        quiet=True,
    )


print("* Pure Python build *" if PURE else "* Compiled build *")
setup(ext_modules=[] if PURE else extensions())
