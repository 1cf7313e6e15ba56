"""The `tls`, `auth` and `log_prompts` config sections and what reads them, without Ray: key loading
(config, environment, file), clear errors for a missing key or certificate, the rate limiter's
bucket, the Gate's answers, and the serve options that turn TLS on for Serve's HTTP proxy."""

from __future__ import annotations

import pytest
from shardserve.cluster.config import AppConfig, ConfigError, ServeConfig, parse_config
from shardserve.cluster.ingress.auth import Gate, load_keys
from shardserve.cluster.ingress.errors import ApiError
from shardserve.cluster.ingress.ratelimit import RateLimited, RateLimiter
from shardserve.cluster.ingress.tls import http_ssl_options
from shardserve.cluster.messages import ErrorKind
from shardserve.workers.env_overrides import API_KEY_ENV

MODELS = [{"name": "m"}]


def config(**sections) -> AppConfig:
    return parse_config({"models": MODELS, **sections}, AppConfig)


def test_defaults_are_open_plaintext_and_quiet():
    c = config()
    assert c.tls is None and c.auth.api_keys == [] and c.log_prompts is False


@pytest.mark.parametrize(("auth", "message"), [
    ({"api_keys": [{"name": "a"}]}, "set exactly one of key, key_env, key_file, got none"),
    ({"api_keys": [{"name": "a", "key": "12345678", "key_file": "/k"}]}, "got ['key', 'key_file']"),
    ({"api_keys": [{"name": "a", "key": "short"}]}, "auth.api_keys[0].key"),
    ({"api_keys": [{"name": "a", "key_env": "A", "requests_per_minute": 0}]}, "requests_per_minute: must be > 0"),
    ({"api_keys": [{"name": "a", "key_env": "A", "tokens_per_minute": -1}]}, "tokens_per_minute: must be > 0"),
    ({"api_keys": [{"name": "a", "key_env": "A"}, {"name": "a", "key_env": "B"}]}, "repeated: ['a']"),
    ({"api_keys": [{"name": "a b", "key_env": "A"}]}, "auth.api_keys[0].name"),
])  # fmt: skip
def test_bad_auth_sections_name_the_field(auth, message):
    with pytest.raises(ConfigError) as err:
        config(auth=auth)
    assert message in str(err.value)
    assert "short" not in str(err.value)  # a rejected key is not echoed


@pytest.mark.parametrize(("tls", "message"), [
    ({"cert_file": "/c"}, "tls.key_file: Field required"),
    ({"cert_file": "/c", "key_file": "/k", "require_client_auth": True}, "needs ca_file"),
    ({"cert_file": "/c", "key_file": "/k", "ca_file": "/a", "http_client_auth_unsupported_ok": True},
     "tls.http_client_auth_unsupported_ok"),  # gone: mutual TLS now holds on HTTP too
])  # fmt: skip
def test_bad_tls_sections_name_the_field(tls, message):
    with pytest.raises(ConfigError) as err:
        config(tls=tls)
    assert message in str(err.value)


def test_keys_come_from_config_env_and_file(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("  sk-from-file-1234\n")
    monkeypatch.setenv("TEST_KEY_VAR", "sk-from-env-1234")
    monkeypatch.setenv(API_KEY_ENV, "sk-legacy-1234")
    c = config(auth={"api_keys": [
        {"name": "inline", "key": "sk-inline-1234", "requests_per_minute": 2},
        {"name": "env", "key_env": "TEST_KEY_VAR"},
        {"name": "file", "key_file": str(key_file)},
    ]})  # fmt: skip
    assert "sk-inline" not in repr(c)  # the config's repr hides inline keys ...
    assert c.model_dump(mode="json")["auth"]["api_keys"][0]["key"] == "sk-inline-1234"  # ... its JSON keeps them
    keys = load_keys(c.auth)
    assert [(k.name, k.secret) for k in keys] == [
        ("inline", b"sk-inline-1234"), ("env", b"sk-from-env-1234"), ("file", b"sk-from-file-1234"),
        ("default", b"sk-legacy-1234"),  # SHARDSERVE_API_KEY: one more key, tenant `default`
    ]  # fmt: skip
    assert "sk-" not in repr(keys)
    gate = Gate(keys)
    assert gate.admit("Bearer sk-from-file-1234") == "file"
    assert gate.admit("bearer sk-legacy-1234") == "default"
    for bad in (None, "", "Bearer nope", "sk-inline-1234", "Basic sk-inline-1234"):
        with pytest.raises(ApiError) as err:
            gate.admit(bad)
        assert err.value.kind == ErrorKind.UNAUTHENTICATED and "sk-" not in err.value.message
    assert gate.admit("Bearer sk-inline-1234") == "inline"
    assert gate.admit("Bearer sk-inline-1234") == "inline"
    with pytest.raises(RateLimited) as err:
        gate.admit("Bearer sk-inline-1234")
    assert err.value.http_status == 429 and err.value.openai_body()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(err.value.retry_after_header) <= 30
    assert gate.admit("Bearer sk-from-env-1234") == "env"  # other keys are not limited


def test_missing_key_sources_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_KEY_VAR", raising=False)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [
        ({"name": "a", "key_file": str(tmp_path / "missing")}, "auth.api_keys[0] (a).key_file: cannot read"),
        ({"name": "a", "key_file": str(empty)}, "is empty"),
        ({"name": "a", "key_env": "NOT_SET_KEY_VAR"}, "NOT_SET_KEY_VAR is not set"),
    ]
    for entry, message in cases:
        with pytest.raises(ConfigError) as err:
            load_keys(config(auth={"api_keys": [entry]}).auth)
        assert message in str(err.value)
    same = {"api_keys": [{"name": "a", "key": "sk-same-1234"}, {"name": "b", "key": "sk-same-1234"}]}
    with pytest.raises(ConfigError, match=r"keys \['a', 'b'\] have the same value"):
        load_keys(config(auth=same).auth)
    assert Gate.from_config(config().auth).admit(None) is None  # no key anywhere: open


def test_token_bucket_refills_at_the_configured_rate():
    now = [100.0]
    limiter = RateLimiter({"k": 6}, clock=lambda: now[0])  # 6 a minute: one per 10 s, burst 6
    for _ in range(6):
        limiter.take("k")
    with pytest.raises(RateLimited) as err:
        limiter.take("k")
    assert err.value.retry_after_s == pytest.approx(10.0)
    now[0] += 5
    with pytest.raises(RateLimited) as err:
        limiter.take("k")
    assert err.value.retry_after_s == pytest.approx(5.0)
    now[0] += 5
    limiter.take("k")
    now[0] += 3600  # refills up to the burst only
    for _ in range(6):
        limiter.take("k")
    with pytest.raises(RateLimited):
        limiter.take("k")
    limiter.take("unlimited-key")


def test_token_budget_takes_costs_and_carries_debt():
    now = [0.0]
    limiter = RateLimiter({"k": 60}, clock=lambda: now[0], unit="tokens")  # one token a second back
    limiter.take("k", 50)
    limiter.charge("k", 30)  # a prompt counted after admission: 10 - 30 = a debt of 20
    with pytest.raises(RateLimited, match="60 tokens per minute") as err:
        limiter.take("k", 5)
    assert err.value.retry_after_s == pytest.approx(25.0) and err.value.retry_after_header == "25"
    now[0] += 25
    limiter.take("k", 5)
    limiter.charge("unlimited-key", 10**9)


def test_serve_options_turn_on_https_and_start_no_grpc_proxy(tmp_path):
    from shardserve.cluster.app import serve_options

    cert, key, ca = (tmp_path / n for n in ("c.pem", "k.pem", "ca.pem"))
    for p in (cert, key, ca):
        p.write_text("-----BEGIN X-----\n-----END X-----\n")
    c = parse_config({"models": MODELS, "tls": {"cert_file": str(cert), "key_file": str(key), "ca_file": str(ca)}},
                     ServeConfig)  # fmt: skip
    options = serve_options(c)
    http = options["http_options"]
    assert (http.ssl_certfile, http.ssl_keyfile, http.ssl_ca_certs) == (str(cert), str(key), str(ca))
    assert options["grpc_options"].grpc_servicer_functions == []
    assert "proxy_location" not in options  # server-side TLS: Serve's HTTP proxy serves HTTPS
    assert serve_options(config())["http_options"].ssl_certfile is None
    # Mutual TLS: no Serve HTTP proxy (the Ingress replicas serve HTTPS with client certificates).
    mutual = c.model_copy(update={"tls": c.tls.model_copy(update={"require_client_auth": True})})
    options = serve_options(mutual)
    assert options["proxy_location"] == "Disabled" and options["http_options"].ssl_certfile is None
    key.unlink()
    with pytest.raises(ConfigError, match=r"tls.key_file: cannot read .*k.pem"):
        http_ssl_options(c.tls)
    key.write_text("not a pem")
    with pytest.raises(ConfigError, match="tls.key_file: .* is not a PEM file"):
        http_ssl_options(c.tls)
