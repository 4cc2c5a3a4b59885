from __future__ import annotations

import pytest

from gwcore.config import ConfigError, load_config, masked


def load(tmp_path, text=None, env=None, **overrides):
    path = None
    if text is not None:
        path = tmp_path / "g.yaml"
        path.write_text(text)
    return load_config(path, environ=env or {}, cwd=tmp_path, overrides=overrides)


def test_defaults_match_the_design(tmp_path):
    cfg = load(tmp_path)
    assert (cfg.server.host, cfg.server.port, cfg.server.workers) == ("127.0.0.1", 8080, 1)
    assert cfg.server.max_header_bytes == 64 * 1024
    assert cfg.server.max_body_bytes == 10 * 1024 * 1024
    assert cfg.server.header_timeout_s == 10
    assert (cfg.limits.default.requests, cfg.limits.default.window_s) == (1000, 3600)
    assert cfg.cache.enabled is False


def test_environment_overrides_the_file_and_variables_expand(tmp_path):
    cfg = load(tmp_path, "server: {port: 1234}\nmodels:\n  - name: m\n    deployments:\n"
                         "      - {provider: openai, model: gpt-4o, api_key: '${K}',"
                         " base_url: '${B:-http://default/v1}'}\n",
               env={"GATEWAY_PORT": "4321", "K": "sk-from-env", "GATEWAY_API_KEYS": "a-key-123, b-key-456"})
    assert cfg.server.port == 4321
    dep = cfg.models[0].deployments[0]
    assert (dep.api_key, dep.base_url) == ("sk-from-env", "http://default/v1")
    assert cfg.api_keys == ["a-key-123", "b-key-456"]


def test_every_error_is_reported_with_its_path(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, "models:\n  - name: a\n    deployments: []\n  - name: b\n"
                       "    deployments:\n      - {provider: openai}\n    retries: lots\n"
                       "limits: {default: {requests: -}}\nkeys: [{key: '${MISSING}', name: k}]\n")
    text = "\n".join(err.value.errors)
    assert "models[0]: deployments must not be empty" in text
    assert "models[1].deployments[0].model: required field is missing" in text
    assert "models[1].retries: expected an integer" in text
    assert "limits.default.requests: expected an integer" in text
    assert "keys[0].key: environment variable MISSING is not set" in text
    assert len(err.value.errors) == 5


def test_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, "models:\n  - {name: a, fallbacks: [a], deployments: [{provider: mock, model: x}]}\n"
                       "  - {name: a, deployments: [{provider: mock, model: y}]}\n"
                       "providers: {azure: {api_key: x}}\nserver: {port: 70000}\n")
    text = "\n".join(err.value.errors)
    assert "models[0].fallbacks[0]: a model cannot fall back to itself" in text
    assert "providers.azure: unknown provider" in text
    assert "server.port: expected 0..65535" in text
    assert "models[1].name: duplicate model name 'a'" in text
    with pytest.raises(ConfigError, match=r"models\[0\]\.deployments\[0\]: weight must be > 0"):
        load(tmp_path, "models: [{name: a, deployments: [{provider: mock, model: y, weight: 0}]}]")


def test_secrets_are_masked(tmp_path):
    cfg = load(tmp_path, env={"OPENAI_API_KEY": "sk-1234567890abcdef",
                              "GATEWAY_MASTER_KEY": "master-1234567890",
                              "REDIS_URL": "redis://:hunter22@r:6379/0"})
    text = repr(masked(cfg))
    assert "1234567890" not in text and "hunter22" not in text
    assert masked(cfg)["providers"]["openai"]["api_key"].startswith("sk-")


def test_bad_yaml_and_missing_file_are_clear(tmp_path):
    (tmp_path / "bad.yaml").write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml", environ={}, cwd=tmp_path)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.yaml", environ={}, cwd=tmp_path)
