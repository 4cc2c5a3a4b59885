"""Static checks of docker/: Dockerfile, .dockerignore, compose file, Kubernetes manifests.

The manifests are validated against the Kubernetes OpenAPI schemas with
kubernetes-validate (offline: the schemas ship in the package)."""
from __future__ import annotations

import fnmatch
import re
import subprocess
from typing import Any

import pytest
import yaml

from gwcore.config import PLACEHOLDER_MARKERS, ConfigError, ServerConfig, load_config
from tests.deploy.helpers import DOCKER, ENTRYPOINT, ENV_EXAMPLE, ROOT

K8S = DOCKER / "k8s"
# The oldest Kubernetes release still commonly run, and the newest the package knows.
K8S_VERSIONS = ("1.29.0", "latest")


# ----------------------------------------------------------------------------- Dockerfile

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DOCKER / "Dockerfile").read_text()
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    out = []
    for line in logical:
        instr, _, args = line.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for instr, args in dockerfile():
        if instr == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, re.IGNORECASE)
            assert m, f"every stage is named: FROM {args}"
            current = m.group(2)
            result[current] = [(instr, args)]
        elif current is not None:
            result[current].append((instr, args))
    return result


def test_dockerfile_base_is_a_build_argument():
    instrs = dockerfile()
    assert instrs[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    froms = [a for i, a in instrs if i == "FROM"]
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE} AS runtime"]


def test_dockerfile_build_stage_compiles_the_wheel():
    build = " ".join(a for _, a in stages()["build"])
    assert "python3 -m venv /opt/gwcore" in build
    assert re.search(r"pip wheel .*\"\.\[postgres,redis\]\" -w /wheels", build)
    assert "gcc" in build  # installed when the base lacks it
    assert "/wheels/gwcore-*-cp311-*.whl" in build  # a compiled wheel, not py3-none-any


def test_dockerfile_runtime_stage():
    runtime = stages()["runtime"]
    by = lambda name: [a for i, a in runtime if i == name]
    runs = " ".join(by("RUN"))
    assert "python3 -m venv /opt/gwcore" in runs
    assert "--no-index --find-links /tmp/wheels" in runs
    assert "apt-get" not in runs and "gcc" not in runs  # no compiler at runtime
    assert "--from=build /wheels /tmp/wheels" in " ".join(by("COPY"))
    assert "gwnative: compiled" in runs  # the image refuses to build pure

    user = by("USER")
    assert len(user) == 1 and re.fullmatch(r"\d+:\d+", user[0]) and int(user[0].split(":")[0]) > 0
    assert by("EXPOSE") == ["8080"]
    env = " ".join(by("ENV"))
    assert "GATEWAY_HOST=0.0.0.0" in env and "GATEWAY_PORT=8080" in env
    assert "GATEWAY_CONFIG" not in env  # set by the entrypoint, only when the file exists
    assert by("WORKDIR") == ["/var/lib/gwcore"]
    assert by("VOLUME") == ['["/etc/gwcore", "/var/lib/gwcore"]']

    hc = by("HEALTHCHECK")
    assert len(hc) == 1 and "CMD" in hc[0] and "/usr/local/bin/gwcore-healthcheck" in hc[0]
    assert "/healthz" in (DOCKER / "healthcheck.py").read_text()
    copies = by("COPY")
    assert "docker/healthcheck.py /usr/local/bin/gwcore-healthcheck" in copies
    assert "docker/entrypoint.sh /usr/local/bin/gwcore-entrypoint" in copies
    assert by("ENTRYPOINT") == ['["/usr/local/bin/gwcore-entrypoint"]']
    assert by("STOPSIGNAL") == ["SIGTERM"]


def _ignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((line.startswith("!"), line.lstrip("!")))
    return out


def _ignored(path: str) -> bool:
    result = False
    for negated, pattern in _ignore_patterns():
        pat = pattern.removeprefix("**/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pattern)
                  or (pattern.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat))
                  for i in range(1, len(parts) + 1))
        if hit:
            result = not negated
    return result


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest():
    sources = []
    for instr, args in dockerfile():
        if instr == "COPY" and "--from=" not in args:
            sources += args.split()[:-1]
    assert {"pyproject.toml", "gwcore", "gwnative", "docker/entrypoint.sh"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _ignored(src), f".dockerignore drops {src}, which the Dockerfile copies"
    for path in (".git", ".venv", ".env", "docker/.env", "build", "gwcore.egg-info",
                 "gwnative/_sse_c.cpython-311-x86_64-linux-gnu.so", "gwnative/_sse_c.c",
                 "gwcore/__pycache__", "tests", "data"):
        assert _ignored(path), f".dockerignore lets {path} into the build context"


def test_entrypoint_is_posix_sh_and_execs_the_gateway():
    assert ENTRYPOINT.stat().st_mode & 0o111, "entrypoint.sh must be executable"
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)
    text = ENTRYPOINT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert 'exec $GWCORE serve "$@"' in text
    assert "$GWCORE migrate" in text


# ------------------------------------------------------------------------------- compose

def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_compose_services_ports_volumes_healthchecks():
    c = compose()
    services = c["services"]
    assert set(services) == {"gateway", "redis", "postgres"}
    gw = services["gateway"]
    assert gw["build"] == {"context": "..", "dockerfile": "docker/Dockerfile",
                           "args": {"BASE_IMAGE": "${BASE_IMAGE:-python:3.11-slim}"}}
    assert (DOCKER / gw["build"]["context"] / gw["build"]["dockerfile"]).is_file()
    assert gw["ports"] == ["${GATEWAY_PUBLISH:-8080}:8080"]
    assert gw["env_file"] == ".env"
    assert gw["depends_on"] == {"redis": {"condition": "service_healthy"},
                                "postgres": {"condition": "service_healthy"}}
    # A stop grace that covers the 30 s drain.
    assert int(gw["stop_grace_period"].rstrip("s")) >= ServerConfig().shutdown_grace_s + 5

    named = set(c["volumes"])
    mounts = {name: [v.split(":")[0] for v in s.get("volumes", [])] for name, s in services.items()}
    assert "gateway-data" in mounts["gateway"] and "redis-data" in mounts["redis"]
    assert "postgres-data" in mounts["postgres"]
    assert {"gateway-data", "redis-data", "postgres-data"} == named
    targets = {v.split(":")[1] for v in services["gateway"]["volumes"]}
    assert targets == {"/var/lib/gwcore", "/etc/gwcore"}
    assert "/var/lib/postgresql/data" in services["postgres"]["volumes"][0]
    assert services["redis"]["volumes"] == ["redis-data:/data"]

    for name, svc in services.items():
        hc = svc["healthcheck"]
        assert hc["test"][0] in ("CMD", "CMD-SHELL"), name
        assert hc["interval"] and hc["retries"] >= 3, name
    assert "gwcore-healthcheck" in " ".join(gw["healthcheck"]["test"])
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][1]
    assert "redis-cli ping" in services["redis"]["healthcheck"]["test"][1]


def test_compose_variables_are_in_the_env_example():
    text = (DOCKER / "docker-compose.yml").read_text()
    example = ENV_EXAMPLE.read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    assert required == {"REDIS_PASSWORD", "POSTGRES_PASSWORD"}
    for name in required | {"POSTGRES_USER", "POSTGRES_DB"}:
        assert re.search(rf"^{name}=", example, re.MULTILINE), name


# ---------------------------------------------------------------------------- Kubernetes

def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the resource, for every manifest file (one resource per file)."""
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert len(docs) == 1, path
        out[docs[0]["kind"]] = docs[0] | {"__file__": path.name}
    return out


def test_k8s_has_every_resource():
    m = manifests()
    assert set(m) == {"Deployment", "Service", "ConfigMap", "Secret",
                      "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert m["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    # Everything but the Secret template, which is filled in and applied by hand.
    assert sorted(kust["resources"]) == sorted(r["__file__"] for r in m.values()
                                               if r["kind"] != "Secret")


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("kind", ["Deployment", "Service", "ConfigMap", "Secret",
                                  "HorizontalPodAutoscaler", "PodDisruptionBudget"])
def test_k8s_manifest_validates_against_the_schema(kind, version):
    import kubernetes_validate

    if version == "latest":
        version = kubernetes_validate.utils.latest_version()
    resource = {k: v for k, v in manifests()[kind].items() if k != "__file__"}
    # strict: unknown fields are errors too (a typo'd field is silently ignored otherwise).
    kubernetes_validate.validate(resource, version, strict=True)


def _pod() -> dict[str, Any]:
    return manifests()["Deployment"]["spec"]["template"]["spec"]


def _container() -> dict[str, Any]:
    (c,) = _pod()["containers"]
    return c


def _gateway_yaml() -> dict[str, Any]:
    return yaml.safe_load(manifests()["ConfigMap"]["data"]["gateway.yaml"])


def test_probes_point_at_real_endpoints_on_the_container_port():
    routes = (ROOT / "gwcore" / "api" / "routes.py").read_text()
    get_paths = set(re.findall(r'\("GET", "(/[^"]*)"\)', routes))
    c = _container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["GATEWAY_PORT"] == "8080" and env["GATEWAY_HOST"] == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in get_paths, f"{probe}: {get['path']} is not a gateway endpoint"
        assert ports.get(get["port"], get["port"]) == 8080
    svc = manifests()["Service"]["spec"]
    assert svc["ports"][0]["targetPort"] in ("http", 8080)
    assert "EXPOSE 8080" in (DOCKER / "Dockerfile").read_text()


def test_termination_grace_covers_prestop_drain_and_margin():
    pod, c = _pod(), _container()
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    pre_stop = int(cmd[1])
    assert pre_stop >= 5  # long enough for the Service to stop routing here
    drain = _gateway_yaml()["server"].get("shutdown_grace_s", ServerConfig().shutdown_grace_s)
    assert drain == 30
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 5


def test_pod_security_and_writable_dirs():
    pod, c = _pod(), _container()
    dockerfile_text = (DOCKER / "Dockerfile").read_text()
    uid = int(re.search(r"^USER (\d+):", dockerfile_text, re.MULTILINE).group(1))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/var/lib/gwcore"]]
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert volumes[mounts["/etc/gwcore"]]["configMap"]["name"] == \
        manifests()["ConfigMap"]["metadata"]["name"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])


def test_replicas_selectors_and_references_agree():
    m = manifests()
    dep = m["Deployment"]
    assert dep["spec"]["replicas"] == 3
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert m["Service"]["spec"]["selector"].items() <= labels.items()
    assert m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = m["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": dep["metadata"]["name"]}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] >= hpa["minReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (src,) = _container()["envFrom"]
    assert src["secretRef"]["name"] == m["Secret"]["metadata"]["name"]


def test_configmap_is_a_valid_gateway_config(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(manifests()["ConfigMap"]["data"]["gateway.yaml"])
    cfg = load_config(path, environ={}, cwd=tmp_path)
    assert cfg.server.shutdown_grace_s == 30


def test_secret_template_holds_placeholders_the_gateway_refuses(tmp_path):
    data = manifests()["Secret"]["stringData"]
    # Redis and Postgres are external services, named by URL.
    assert data["REDIS_URL"].startswith("redis://")
    assert data["DATABASE_URL"].startswith("postgresql://")
    for name in ("GATEWAY_MASTER_KEY", "GATEWAY_API_KEYS"):
        assert any(mk in data[name] for mk in PLACEHOLDER_MARKERS), name
    path = tmp_path / "gateway.yaml"
    path.write_text(manifests()["ConfigMap"]["data"]["gateway.yaml"])
    with pytest.raises(ConfigError, match="placeholder"):
        load_config(path, environ=dict(data), cwd=tmp_path)


def test_readme_deploy_sections():
    text = (ROOT / "README.md").read_text()
    for heading in ("Deploy with compose", "Deploy on Kubernetes", "Scaling out",
                    "Upgrading (migrations)", "Backups of the Postgres data"):
        assert re.search(rf"^#+ {re.escape(heading)}$", text, re.MULTILINE), heading
    for name in ("api_keys", "usage_daily", "key_spend", "audit_log", "pg_dump",
                 "gwcore migrate"):
        assert name in text, name
    # Shell snippets use real files.
    for path in re.findall(r"docker/[\w./-]+\.(?:yml|yaml|example)", text):
        assert (ROOT / path).exists(), path
