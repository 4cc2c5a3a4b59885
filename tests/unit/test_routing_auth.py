from __future__ import annotations

import random
from collections import Counter

import pytest

from gwcore.auth import Authenticator
from gwcore.config import load_config
from gwcore.errors import InvalidApiKey, ModelNotAllowed
from gwcore.routing import Router, attempt_order


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
    rng = random.Random(7)
    firsts = Counter(attempt_order(route, rng)[0].model for _ in range(4000))
    assert 0.70 < firsts["a"] / 4000 < 0.80  # 3:1 weights -> 75% first


def test_keys_authenticate_by_digest_and_check_models(tmp_path):
    c = cfg(tmp_path, "keys:\n  - {key: team-a-key-123, name: team-a, models: [m1]}\n",
            GATEWAY_API_KEYS="plain-key-1234", GATEWAY_MASTER_KEY="master-key-1234")
    auth = Authenticator(c)
    assert auth.authenticate(b"Bearer team-a-key-123").name == "team-a"
    assert auth.authenticate(b"bearer plain-key-1234").name == "api-key-1"
    assert auth.authenticate(b"Bearer master-key-1234").is_master
    assert auth.authenticate(None, b"plain-key-1234").name == "api-key-1"
    for bad in (None, b"Bearer", b"Basic abc", b"Bearer team-a-key-12", b"Bearer TEAM-A-KEY-123"):
        with pytest.raises(InvalidApiKey) as err:
            auth.authenticate(bad)
        assert "team-a-key" not in err.value.message
    key = auth.authenticate(b"Bearer team-a-key-123")
    key.check_model("m1")
    with pytest.raises(ModelNotAllowed):
        key.check_model("m2")


def test_no_keys_means_open(tmp_path):
    auth = Authenticator(cfg(tmp_path))
    assert not auth.enabled
    assert auth.authenticate(None).name == "anonymous"
