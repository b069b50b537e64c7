"""JWT verification: what is accepted and what is refused, key reloads, auth settings (no services)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from pathlib import Path

import jwt
import pytest

from config import GatewaySettings, SettingsError
from gateway.auth import Authenticator
from gateway.devkeys import DevKeys, ensure_dev_keys, mint
from gateway.jwks import JwksFile, KeySourceError, OidcJwks
from gateway.problems import Problem


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> DevKeys:
    return ensure_dev_keys(tmp_path_factory.mktemp("secrets"))


def authenticator(keys: DevKeys, *, hs256: bool = True, jwks_file: Path | None = None,
                  clock: FakeClock | None = None, refresh_min_s: float = 30.0) -> Authenticator:
    source = JwksFile(jwks_file or keys.jwks_file, max_bytes=64 * 1024, refresh_min_s=refresh_min_s,
                      max_age_s=3600, **({"clock": clock} if clock else {}))
    source.load()
    return Authenticator(keys=source, hs256_secret=keys.hs256_secret_file.read_bytes().strip() if hs256 else None,
                         issuer="detectflow", audience="detectflow-api", tenant_claim="tenant", leeway_s=30,
                         max_lifetime_s=24 * 3600)


def refused(auth: Authenticator, token: str, reason: str | None = None) -> str:
    with pytest.raises(Problem) as info:
        auth.verify(token)
    assert info.value.status == 401
    assert info.value.code == "INVALID_TOKEN"
    if reason is not None:
        assert info.value.extra["reason"] == reason, info.value.detail
    return info.value.detail


def test_dev_keys_are_private_and_stable(keys: DevKeys, tmp_path: Path) -> None:
    assert keys.private_key_file.stat().st_mode & 0o077 == 0
    assert keys.hs256_secret_file.stat().st_mode & 0o077 == 0
    jwks = keys.jwks_file.read_text()
    assert ensure_dev_keys(keys.private_key_file.parent).jwks_file.read_text() == jwks
    assert "\"d\"" not in jwks  # public parts only


def test_valid_rs256_and_hs256_tokens_give_the_principal(keys: DevKeys) -> None:
    auth = authenticator(keys)
    for alg in ("RS256", "HS256"):
        header = "Bearer " + mint(keys, tenant="acme", scopes=["detect:write"], algorithm=alg)
        p = asyncio.run(auth.authenticate(header))
        assert (p.tenant, p.subject, p.scopes) == ("acme", "dev:acme", frozenset({"detect:write"}))
        p.require("detect:write")
        with pytest.raises(Problem) as info:
            p.require("results:read")
        assert info.value.status == 403
    admin = auth.verify(mint(keys, tenant="acme", scopes=["admin"]))
    admin.require("results:read")  # admin implies every scope


def test_refusals(keys: DevKeys, tmp_path: Path) -> None:
    auth = authenticator(keys)
    now = time.time()
    assert "expired" in refused(auth, mint(keys, tenant="a", scopes=[], ttl_s=-60), "expired")
    assert "not yet valid" in refused(auth, mint(keys, tenant="a", scopes=[], now=now + 3600), "not_yet_valid")
    refused(auth, mint(keys, tenant="a", scopes=[], audience="other"), "wrong_audience")
    refused(auth, mint(keys, tenant="a", scopes=[], issuer="other"), "wrong_issuer")
    claims = {"iss": "detectflow", "aud": "detectflow-api", "sub": "s", "tenant": "a", "iat": int(now),
              "exp": int(now) + 60}
    assert "none" in refused(auth, jwt.encode(claims, None, algorithm="none"), "algorithm_not_accepted")
    other = ensure_dev_keys(tmp_path / "other")
    kid = json.loads(keys.jwks_file.read_text())["keys"][0]["kid"]
    forged = jwt.encode(claims, other.private_key_file.read_bytes(), algorithm="RS256", headers={"kid": kid})
    refused(auth, forged, "bad_signature")
    assert "unknown signing key" in refused(auth, mint(other, tenant="a", scopes=[]), "unknown_key")
    # Key confusion: an HS256 token whose HMAC key is the RSA public key (PEM and JWK forms).
    for public in (keys.jwks_file.read_bytes(), _public_pem(keys)):
        head = jwt.utils.base64url_encode(b'{"alg":"HS256"}').decode()
        body = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
        sig = jwt.utils.base64url_encode(hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest())
        refused(auth, f"{head}.{body}.{sig.decode()}")
    refused(auth, mint(keys, tenant="a", scopes=[], extra={"tenant": "../etc"}), "invalid_tenant")
    refused(auth, "abc", "malformed")
    with pytest.raises(Problem) as info:
        asyncio.run(auth.authenticate("Basic dXNlcjpwYXNz"))
    assert info.value.code == "UNAUTHENTICATED"


def test_hs256_is_refused_outside_dev_mode(keys: DevKeys) -> None:
    token = mint(keys, tenant="a", scopes=[], algorithm="HS256")
    assert "HS256" in refused(authenticator(keys, hs256=False), token, "algorithm_not_accepted")


def test_iat_is_required_not_in_the_future_and_the_lifetime_is_bounded(keys: DevKeys) -> None:
    auth = authenticator(keys)
    now = int(time.time())
    # iat an hour ahead (nbf now, so only iat is wrong): refused beyond the clock skew, accepted within it.
    assert "future" in refused(auth, mint(keys, tenant="a", scopes=[], now=now + 3600, extra={"nbf": now}),
                               "issued_in_future")
    auth.verify(mint(keys, tenant="a", scopes=[], now=now + 10, extra={"nbf": now}))
    # exp - iat over 24 h is refused even though the token is current; exactly 24 h passes.
    assert "at most 86400s" in refused(auth, mint(keys, tenant="a", scopes=[], ttl_s=24 * 3600 + 1),
                                       "lifetime_too_long")
    auth.verify(mint(keys, tenant="a", scopes=[], ttl_s=24 * 3600))
    # A token issued long ago with a long exp: the bound is on exp - iat, not on the time left.
    refused(auth, mint(keys, tenant="a", scopes=[], now=now - 7 * 24 * 3600, ttl_s=8 * 24 * 3600),
            "lifetime_too_long")
    # No iat at all.
    no_iat = jwt.encode({"iss": "detectflow", "aud": "detectflow-api", "sub": "s", "tenant": "a", "exp": now + 60},
                        keys.private_key_file.read_bytes(), algorithm="RS256",
                        headers={"kid": json.loads(keys.jwks_file.read_text())["keys"][0]["kid"]})
    assert "iat" in refused(auth, no_iat, "missing_claim")


def test_an_unknown_kid_reloads_the_jwks_file_so_rotation_needs_no_restart(keys: DevKeys, tmp_path: Path) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(keys.jwks_file.read_text())
    clock = FakeClock()
    auth = authenticator(keys, jwks_file=jwks_file, clock=clock)
    assert auth.keys is not None and auth.keys.loads == 1
    new = ensure_dev_keys(tmp_path / "new")
    rotated = mint(new, tenant="a", scopes=[])
    # Published while the last load is recent: the reload waits for refresh_min_s.
    jwks_file.write_text(json.dumps({"keys": [*json.loads(new.jwks_file.read_text())["keys"],
                                              *json.loads(keys.jwks_file.read_text())["keys"]]}))
    refused(auth, rotated, "unknown_key")
    assert auth.keys.loads == 1
    clock.now += 31
    assert asyncio.run(auth.authenticate(f"Bearer {rotated}")).tenant == "a"  # reloaded off the event loop
    assert auth.keys.loads == 2
    auth.verify(mint(keys, tenant="a", scopes=[]))  # the old key is still published, so still accepted


def test_reloads_on_unknown_kids_are_rate_limited(keys: DevKeys, tmp_path: Path) -> None:
    clock = FakeClock()
    auth = authenticator(keys, clock=clock)
    assert auth.keys is not None
    fetches = 0
    real_fetch = auth.keys._fetch

    def counting_fetch() -> dict:
        nonlocal fetches
        fetches += 1
        return real_fetch()

    auth.keys._fetch = counting_fetch  # type: ignore[method-assign]
    stranger = ensure_dev_keys(tmp_path / "stranger")
    clock.now += 31
    for i in range(50):  # a flood of made-up kids
        token = jwt.encode({"sub": "s"}, stranger.private_key_file.read_bytes(), algorithm="RS256",
                           headers={"kid": f"random-{i}"})
        refused(auth, token, "unknown_key")
        assert not auth.keys.wants_reload(f"random-{i + 1}")
    assert fetches == 1
    clock.now += 31
    refused(auth, mint(stranger, tenant="a", scopes=[]), "unknown_key")
    assert fetches == 2
    # A known kid does not reload until the cache is max_age_s old.
    auth.verify(mint(keys, tenant="a", scopes=[]))
    assert fetches == 2


def test_a_failed_reload_keeps_the_keys_held(keys: DevKeys, tmp_path: Path) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(keys.jwks_file.read_text())
    clock = FakeClock()
    auth = authenticator(keys, jwks_file=jwks_file, clock=clock)
    jwks_file.write_text("{not json")
    clock.now += 3601  # stale: the next lookup reloads, fails, and keeps the old keys
    auth.verify(mint(keys, tenant="a", scopes=[]))
    with pytest.raises(KeySourceError):
        JwksFile(jwks_file, max_bytes=1024, refresh_min_s=1, max_age_s=1).load()


def test_the_issuer_must_be_https_unless_it_is_on_this_machine() -> None:
    for url in ("https://login.example.com/tenant", "http://127.0.0.1:8443", "http://localhost/x", "http://[::1]:80"):
        assert GatewaySettings.idp_url_problem(url) is None, url
    for url in ("http://login.example.com", "ftp://127.0.0.1", "127.0.0.1:80", "http://10.0.0.1"):
        assert GatewaySettings.idp_url_problem(url), url
    with pytest.raises(KeySourceError):
        OidcJwks("http://idp.example.com", None, refresh_min_s=1, max_age_s=1)  # type: ignore[arg-type]


def test_auth_settings_are_strict_and_dev_mode_is_explicit(tmp_path: Path) -> None:
    home = {"DETECTFLOW_HOME": str(tmp_path)}
    plain = GatewaySettings.from_env(home)
    assert (plain.auth_dev, plain.allow_hs256, plain.jwks_file, plain.hs256_secret_file) == (False, False, None, None)
    with pytest.raises(SettingsError, match=r"DETECTFLOW_OIDC_ISSUER.*DETECTFLOW_JWKS_FILE.*DETECTFLOW_AUTH_DEV"):
        plain.require_auth_source()
    dev = GatewaySettings.from_env({**home, "DETECTFLOW_AUTH_DEV": "true"})
    dev.require_auth_source()
    assert dev.allow_hs256 and dev.jwks_file == tmp_path.resolve() / "secrets" / "jwks.json"
    oidc = GatewaySettings.from_env({**home, "DETECTFLOW_OIDC_ISSUER": "https://idp.example.com/realm"})
    oidc.require_auth_source()
    assert (oidc.issuer, oidc.jwks_file, oidc.max_token_lifetime_s) == ("https://idp.example.com/realm", None, 86400)
    bad = {"DETECTFLOW_AUTH_DEV": "maybe", "DETECTFLOW_ALLOW_HS256": "true",
           "DETECTFLOW_OIDC_ISSUER": "http://idp.example.com", "DETECTFLOW_JWT_MAX_LIFETIME_S": "0",
           "DETECTFLOW_OIDC_CA_BUNDLE": str(tmp_path / "missing.pem")}
    for name, value in bad.items():
        with pytest.raises(SettingsError, match=name):
            GatewaySettings.from_env({**home, name: value})
    with pytest.raises(SettingsError, match="not both"):
        GatewaySettings.from_env({**home, "DETECTFLOW_OIDC_ISSUER": "https://idp.example.com",
                                  "DETECTFLOW_JWKS_FILE": str(tmp_path / "jwks.json")})


def test_the_token_command_is_dev_only_and_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from infra.cli import main

    monkeypatch.setenv("DETECTFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("DETECTFLOW_AUTH_DEV", raising=False)
    assert main(["token", "--tenant", "acme"]) == 2
    assert "DETECTFLOW_AUTH_DEV" in capsys.readouterr().err
    assert not (tmp_path / "secrets").exists()  # no dev keys made outside dev mode
    monkeypatch.setenv("DETECTFLOW_AUTH_DEV", "true")
    assert main(["token", "--tenant", "acme", "--ttl", str(24 * 3600 + 1)]) == 2
    assert "DETECTFLOW_JWT_MAX_LIFETIME_S" in capsys.readouterr().err
    assert main(["token", "--tenant", "acme", "--ttl", "600"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 600 and claims["tenant"] == "acme"


def _public_pem(keys: DevKeys) -> bytes:
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(keys.private_key_file.read_bytes(), None)
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
