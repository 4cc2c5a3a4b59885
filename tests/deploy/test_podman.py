"""Build docker/Dockerfile and run the image with podman, without a Docker daemon.

Opt-in: ``GWCORE_PODMAN_TEST=1 .venv/bin/python -m pytest tests/deploy -m podman -s``
(the conftest deselects it otherwise; it takes minutes).  Skipped only when podman is not
installed.  Needs root, podman, runc and debootstrap (Debian: apt-get install podman runc
debootstrap), and network access to the Debian mirror and to PyPI.

The steps, each timed (printed with -s, and written to $WORK/timings.json):
  1. base image: a Debian bookworm rootfs from ``debootstrap`` (python3.11, python3-venv,
     python3-dev, gcc), ``podman import``-ed as localhost/gwcore-test-base:bookworm, so no
     registry is needed.  Reused from an earlier run (same storage) unless
     GWCORE_PODMAN_REBUILD_BASE=1;
  2. ``podman build --isolation chroot --format docker`` with ``--build-arg
     BASE_IMAGE=<that base>`` (the swappable base).  The host's CA bundle is mounted for
     pip in case the network to PyPI goes through a TLS-intercepting proxy;
  3. ``podman run`` (runc, cgroupfs, host network, vfs storage, a containers.conf with
     ``default_ulimits = []``) in --demo mode on a free GATEWAY_PORT: 200 from /healthz
     answered by PID 1 (the entrypoint exec'd), a chat completion with a gateway key, the
     image's HEALTHCHECK, a non-root user, compiled gwnative modules;
  4. ``podman stop``: SIGTERM, the drain, exit code 0 and the "stopped" line.

Storage lives in $GWCORE_PODMAN_WORKDIR (default /var/tmp/gwcore-podman-test), apart from
any other podman storage of the machine; after the test only the base image (~0.6 GB)
stays there (the vfs driver copies the whole filesystem per layer: a build needs ~10 GB
of free disk while it runs).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy.helpers import ROOT
from tests.support.procs import free_port

pytestmark = [pytest.mark.podman, pytest.mark.slow]

WORK = Path(os.environ.get("GWCORE_PODMAN_WORKDIR", "/var/tmp/gwcore-podman-test"))
BASE = "localhost/gwcore-test-base:bookworm"
IMAGE = "localhost/gwcore:podman-test"
PACKAGES = "python3.11,python3-venv,python3-dev,gcc,libc6-dev"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 or one-line format)."""
    if os.environ.get("GWCORE_DEBIAN_MIRROR"):
        return os.environ["GWCORE_DEBIAN_MIRROR"]
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file() or not f.name.endswith((".list", ".sources")):
            continue
        text = f.read_text(errors="replace")
        for uri in re.findall(r"^URIs:\s*(\S+)", text, re.MULTILINE) + \
                re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.MULTILINE):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return "http://deb.debian.org/debian"


class Podman:
    def __init__(self, conf: Path) -> None:
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.base = ["podman", "--root", str(WORK / "storage"), "--runroot", str(WORK / "run"),
                     "--storage-driver", "vfs"]
        self.runtime = ["--cgroup-manager", "cgroupfs", "--runtime", "runc"]

    def __call__(self, *args: str, check: bool = True, timeout_s: float = 120,
                 runtime: bool = False, **kw) -> subprocess.CompletedProcess[str]:
        cmd = self.base + (self.runtime if runtime else []) + list(args)
        r = subprocess.run(cmd, check=False, env=self.env, capture_output=True, text=True,
                           timeout=timeout_s, stdin=subprocess.DEVNULL, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n"
                                 f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        return r


def test_image_builds_and_serves_with_podman(tmp_path):
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (Debian: apt-get install podman runc debootstrap)")
    for tool in ("runc", "debootstrap"):
        assert shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists(), \
            f"{tool} is missing: apt-get install {tool}"
    assert os.geteuid() == 0, "debootstrap and vfs storage as used here need root"
    WORK.mkdir(parents=True, exist_ok=True)
    conf = tmp_path / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    podman = Podman(conf)
    timings: dict[str, float] = {}

    def step(name: str, started: float) -> None:
        timings[name] = round(time.monotonic() - started, 1)
        print(f"[podman test] {name}: {timings[name]} s", flush=True)

    try:
        # 1. A base image made offline from a debootstrap rootfs.
        t = time.monotonic()
        have_base = podman("image", "exists", BASE, check=False).returncode == 0
        if have_base and os.environ.get("GWCORE_PODMAN_REBUILD_BASE") != "1":
            print(f"[podman test] reusing {BASE} (GWCORE_PODMAN_REBUILD_BASE=1 rebuilds it)")
        else:
            rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=WORK))
            rootfs.chmod(0o755)  # it becomes the image's "/": mkdtemp's 0700 locks out non-root
            try:
                r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}",
                                    "bookworm", str(rootfs), debian_mirror()],
                                   check=False, capture_output=True, text=True, timeout=1800,
                                   stdin=subprocess.DEVNULL)
                assert r.returncode == 0, \
                    f"debootstrap failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
                step("debootstrap", t)
                t = time.monotonic()
                tar = WORK / "rootfs.tar"
                subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True,
                               timeout=600)
                podman("import", str(tar), BASE, timeout_s=600)
                tar.unlink()
                step("import", t)
            finally:
                shutil.rmtree(rootfs, ignore_errors=True)

        # 2. Build with the base swapped in through the build argument.
        t = time.monotonic()
        build = ["build", "--isolation", "chroot", "--format", "docker", "--network", "host",
                 "--build-arg", f"BASE_IMAGE={BASE}", "-f", str(ROOT / "docker" / "Dockerfile"),
                 "-t", IMAGE]
        if CA_BUNDLE.is_file():  # pip behind a TLS-intercepting proxy trusts what the host does
            pip_conf = tmp_path / "pip.conf"
            pip_conf.write_text(f"[global]\ncert = {CA_BUNDLE}\n")
            build += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"]
        podman(*build, str(ROOT), timeout_s=1800)
        step("build", t)

        inspected = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
        info = inspected["Config"]
        assert info["User"] == "10001:10001"
        assert "8080/tcp" in info["ExposedPorts"]
        assert info["Entrypoint"] == ["/usr/local/bin/gwcore-entrypoint"]
        # podman shows a docker-format image's HEALTHCHECK beside its Config.
        check = info.get("Healthcheck") or inspected["Healthcheck"]
        assert "gwcore-healthcheck" in " ".join(check["Test"])
        assert {"/etc/gwcore", "/var/lib/gwcore"} <= set(info["Volumes"])

        # 3. Run it: host network, a free port, demo mode, a real gateway key.
        t = time.monotonic()
        port = free_port()
        key = "gw-podman-test-key-0123456789"
        name = f"gwcore-test-{os.getpid()}"
        podman("rm", "-f", name, check=False, runtime=True)
        try:
            podman("run", "-d", "--name", name, "--network", "host",
                   "-e", f"GATEWAY_PORT={port}", "-e", f"GATEWAY_API_KEYS={key}",
                   IMAGE, "--demo", runtime=True)
            deadline = time.monotonic() + 90
            health = None
            while time.monotonic() < deadline:
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    if r.status_code == 200:
                        health = r.json()
                        break
                except httpx.HTTPError:
                    pass
                state = podman("inspect", "--format", "{{.State.Status}}", name, runtime=True)
                assert state.stdout.strip() in ("running", "created", "configured"), \
                    podman("logs", name, runtime=True).stderr
                time.sleep(0.3)
            logs = podman("logs", name, runtime=True)
            assert health is not None, f"no 200 from /healthz:\n{logs.stdout}\n{logs.stderr}"
            step("run until /healthz answers", t)
            assert health["pid"] == 1  # the entrypoint exec'd the gateway: it is PID 1

            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                           headers={"authorization": f"Bearer {key}"},
                           json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                              json={"model": "demo", "messages": [{"role": "user",
                                                                   "content": "hi"}]}
                              ).status_code == 401
            assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200

            assert podman("healthcheck", "run", name, check=False,
                          runtime=True).returncode == 0
            assert podman("exec", name, "id", "-u", runtime=True).stdout.strip() == "10001"
            version = podman("exec", name, "gwcore", "version", runtime=True).stdout
            assert "gwnative: compiled" in version
            err = logs.stdout + logs.stderr
            assert "gwcore-entrypoint: running migrations" in err
            assert '"msg":"listening"' in err and '"native":"compiled"' in err

            # 4. SIGTERM through podman stop: drain, exit 0.
            t = time.monotonic()
            podman("stop", "-t", "40", name, runtime=True, timeout_s=60)
            step("stop", t)
            code = podman("inspect", "--format", "{{.State.ExitCode}}", name, runtime=True)
            logs = podman("logs", name, runtime=True)
            out = logs.stdout + logs.stderr
            assert code.stdout.strip() == "0", out
            assert '"msg":"signal","signal":"SIGTERM"' in out
            assert out.index('"msg":"stopped"') > out.index('"msg":"draining"')
        finally:
            podman("rm", "-f", name, check=False, runtime=True)
    finally:
        # vfs keeps a full copy of the filesystem per layer: drop the image and the build
        # stage's layers (GBs); keep only the base for the next run.
        podman("rmi", "-f", IMAGE, check=False)
        podman("image", "prune", "-f", check=False, timeout_s=600)
        (WORK / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        print(f"[podman test] timings: {timings}")
