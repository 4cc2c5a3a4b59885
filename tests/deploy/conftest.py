"""tests/deploy: the container and cluster deployment (docker/).

The podman image test (``@pytest.mark.podman``) is opt-in: it runs only with
``GWCORE_PODMAN_TEST=1`` (it debootstraps a base image, builds and runs the image: minutes,
not seconds), and is deselected otherwise, so the default suite (``.ci/run``) does not
pay for it.  With the variable set and no podman installed, it is skipped.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("GWCORE_PODMAN_TEST") == "1":
        return
    keep, drop = [], []
    for item in items:
        in_here = HERE in Path(str(item.path)).resolve().parents
        (drop if in_here and item.get_closest_marker("podman") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
