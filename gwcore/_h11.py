"""The h11 the server and the native transport use: ``h11_mypyc`` (the same API,
compiled with mypyc) when it is installed, else ``h11``.

``GWCORE_H11=h11`` forces the pure one.  Both sides of the gateway must use the same
module: their events and exceptions are different classes.
"""
from __future__ import annotations

import os
from types import ModuleType


def _pick() -> ModuleType:
    if os.environ.get("GWCORE_H11", "") != "h11":
        try:
            import h11_mypyc
            return h11_mypyc
        except ImportError:
            pass
    import h11 as pure
    return pure


h11 = _pick()
NAME = h11.__name__
