from __future__ import annotations

import random
from collections import Counter

import pytest

from gwcore.auth import Authenticator
from gwcore.config import load_config
from gwcore.errors import InvalidApiKey, ModelNotAllowed
from gwcore.routing import Router, clamp_timeout


def cfg(tmp_path, text="", **env):
    p = tmp_path / "g.yaml"
    p.write_text(text or "{}")
    return load_config(p, environ=env, cwd=tmp_path)


def test_prefix_routing_needs_the_provider_key(tmp_path):
    r = Router(cfg(tmp_path, OPENAI_API_KEY="sk-x"))
    for name in ("gpt-4o", "o1-mini", "o3", "o4-mini", "text-embedding-3-small"):
        assert r.resolve(name).deployments[0].provider == "openai"
    assert r.resolve("claude-3-5-haiku-latest") is None  # no Anthropic key
    r = Router(cfg(tmp_path, ANTHROPIC_API_KEY="k", GOOGLE_AI_API_KEY="g"))
    assert r.resolve("claude-3-5-haiku-latest").deployments[0].provider == "anthropic"
    assert r.resolve("gemini-2.0-flash").deployments[0].provider == "google"
    assert r.resolve("gpt-4o") is None


def test_named_routes_win_and_weights_shape_the_order(tmp_path):
    c = cfg(tmp_path, "models:\n  - name: gpt-4o\n    deployments:\n"
                      "      - {provider: mock, model: a, weight: 3}\n"
                      "      - {provider: mock, model: b, weight: 1}\n", OPENAI_API_KEY="sk")
    route = Router(c).resolve("gpt-4o")
    assert [d.model for d in route.deployments] == ["a", "b"]
    router, rng = Router(c), random.Random(7)
    firsts = Counter(route.deployments[router.pick(route, 0.0, rng, set())].model
                     for _ in range(4000))
    assert 0.70 < firsts["a"] / 4000 < 0.80  # 3:1 weights -> 75% first
    # Under load the less busy one is preferred: with "a" holding 9 requests ...
    for _ in range(9):
        router.started(route, 0, 0.0)
    firsts = Counter(route.deployments[router.pick(route, 0.0, rng, set())].model
                     for _ in range(4000))
    assert firsts["b"] > firsts["a"]
    assert router.pick(route, 0.0, rng, {0, 1}) is None


async def test_keys_authenticate_by_digest_and_check_models(tmp_path):
    c = cfg(tmp_path, "keys:\n  - {key: team-a-key-123, name: team-a, models: [m1]}\n",
            GATEWAY_API_KEYS="plain-key-1234", GATEWAY_MASTER_KEY="master-key-1234")
    auth = Authenticator(c)
    assert (await auth.authenticate(b"Bearer team-a-key-123")).name == "team-a"
    assert (await auth.authenticate(b"bearer plain-key-1234")).name == "api-key-1"
    assert (await auth.authenticate(b"Bearer master-key-1234")).is_master
    assert (await auth.authenticate(None, b"plain-key-1234")).name == "api-key-1"
    for bad in (None, b"Bearer", b"Basic abc", b"Bearer team-a-key-12", b"Bearer TEAM-A-KEY-123"):
        with pytest.raises(InvalidApiKey) as err:
            await auth.authenticate(bad)
        assert "team-a-key" not in err.value.message
    key = await auth.authenticate(b"Bearer team-a-key-123")
    key.check_model("m1")
    with pytest.raises(ModelNotAllowed):
        key.check_model("m2")


async def test_no_keys_means_open(tmp_path):
    auth = Authenticator(cfg(tmp_path))
    assert not auth.enabled
    assert (await auth.authenticate(None)).name == "anonymous"


def test_circuit_breaker_opens_probes_and_closes(tmp_path):
    c = cfg(tmp_path, "models:\n  - name: m\n    failure_threshold: 2\n    cooldown_s: 10\n"
                      "    deployments:\n      - {provider: mock, model: a}\n"
                      "      - {provider: mock, model: b}\n")
    router, rng = Router(c), random.Random(1)
    route = router.resolve("m")
    for t in (0.0, 1.0):
        h = router.started(route, 0, t)
        router.failed(h, route, t)
        router.finished(h)
    assert router.health_of(route, 0).state(2.0) == "open"
    picks = {router.pick(route, 2.0, rng, set()) for _ in range(50)}
    assert picks == {1}  # the open one gets no traffic
    assert router.health_of(route, 0).state(11.0) == "half_open"
    probe = router.started(route, 0, 11.0)  # one probe at a time ...
    assert router.pick(route, 11.0, rng, {1}) is None
    router.failed(probe, route, 11.0)  # ... fails: open again, for twice as long
    router.finished(probe)
    assert router.health_of(route, 0).state(30.0) == "open"
    assert router.health_of(route, 0).state(31.5) == "half_open"
    probe = router.started(route, 0, 31.5)
    router.succeeded(probe, route)
    router.finished(probe)
    assert router.health_of(route, 0).state(31.5) == "closed"
    assert router.last_resort(route, set()) in (0, 1)


def test_several_provider_keys_become_deployments(tmp_path):
    route = Router(cfg(tmp_path, OPENAI_API_KEY="sk-one,sk-two")).resolve("gpt-4o")
    assert [d.api_key for d in route.deployments] == ["sk-one", "sk-two"]


def test_clients_may_lower_timeouts_but_never_raise_them():
    assert clamp_timeout(60, b"5") == 5
    assert clamp_timeout(60, b"600") == 60
    assert clamp_timeout(60, b"nonsense") == 60
    assert clamp_timeout(60, None) == 60
