"""`pip install .` builds the gwnative extensions (or, with GWNATIVE_PURE=1, none)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from tests.support.procs import ROOT

NATIVE = ("_buckets_c", "_cachekey_c", "_sse_c")


def test_a_wheel_build_compiles_every_native_module(tmp_path):
    # Same build as `pip install .`; no isolation so that CI needs no extra download.
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("gwcore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    built = {n.split("/")[-1].split(".")[0] for n in names if n.endswith(".so")}
    if os.environ.get("GWNATIVE_PURE"):
        assert built == set(), "GWNATIVE_PURE=1 must build no extension"
        assert "py3-none-any" in wheel.name
    else:
        assert built == set(NATIVE)
    for twin in ("_buckets_py.py", "_cachekey_py.py", "_sse_py.py", "__init__.py"):
        assert f"gwnative/{twin}" in names
    assert "gwcore/server/h1.py" in names
