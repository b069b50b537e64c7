"""The gateway's Authenticator against a real OpenID provider (oidc-provider, tests/integration/oidc/).

No Kafka or Cassandra: a Node process on 127.0.0.1 issues client-credentials JWT access tokens, and the
Authenticator is configured with nothing but its issuer URL (discovery, then the JWKS, over real HTTP).
`make oidc-provider` installs the package under $DETECTFLOW_HOME; nothing is downloaded here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from jwt.algorithms import RSAAlgorithm

from config import GatewaySettings, StackSettings
from gateway.auth import Authenticator
from gateway.problems import Problem

SCRIPT = Path(__file__).resolve().parent / "oidc" / "provider.mjs"
MODULES = StackSettings.from_env().opt_dir / "oidc-provider" / "node_modules"
AUDIENCE = "detectflow-api"
CLIENTS = [{"client_id": "acme-batch", "client_secret": uuid.uuid4().hex, "tenant": "acme",
            "scope": "detect:write results:read"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def private_jwk() -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key))
    jwk.update({"kid": "k-" + uuid.uuid4().hex[:8], "use": "sig", "alg": "RS256"})
    return jwk


@dataclass
class OpenIdProvider:
    issuer: str
    keys_file: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def jwks_kids(self) -> list[str]:
        uri = requests.get(f"{self.issuer}/.well-known/openid-configuration", timeout=3).json()["jwks_uri"]
        return [k["kid"] for k in requests.get(uri, timeout=3).json()["keys"]]

    def token(self, client: dict[str, str], scope: str) -> str:
        r = requests.post(f"{self.issuer}/token", timeout=5, data={
            "grant_type": "client_credentials", "scope": scope, "client_id": client["client_id"],
            "client_secret": client["client_secret"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["token_type"].lower() == "bearer"
        return str(body["access_token"])

    def rotate(self, deadline_s: float = 10.0) -> str:
        """A new signing key, published first; the old one stays published (tokens it signed live on)."""
        new = private_jwk()
        old = json.loads(self.keys_file.read_text())["keys"]
        self.keys_file.write_text(json.dumps({"keys": [new, *old]}))
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + deadline_s
        while new["kid"] not in self.jwks_kids():
            assert time.monotonic() < deadline, f"the provider did not publish {new['kid']}: {self.log.read_text()}"
            time.sleep(0.05)
        return str(new["kid"])


def wait_ready(provider: OpenIdProvider, deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < deadline:
        if provider.proc.poll() is not None:
            raise RuntimeError(f"oidc-provider exited with {provider.proc.returncode}: {provider.log.read_text()}")
        try:
            r = requests.get(f"{provider.issuer}/.well-known/openid-configuration", timeout=2)
            if r.status_code == 200:
                return
            last = r.status_code
        except requests.ConnectionError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"oidc-provider at {provider.issuer} not ready: {last}; {provider.log.read_text()}")


@contextmanager
def start_provider(workdir: Path, keys_file: Path) -> Iterator[OpenIdProvider]:
    node = shutil.which("node")
    if node is None or not (MODULES / "oidc-provider").is_dir():
        pytest.fail(f"oidc-provider is not installed under {MODULES}: run `make oidc-provider` (needs node and npm)")
    port = free_port()
    log = workdir / f"oidc-{port}.log"
    env = {**os.environ, "OIDC_MODULES": str(MODULES), "OIDC_PORT": str(port), "OIDC_KEYS_FILE": str(keys_file),
           "OIDC_AUDIENCE": AUDIENCE, "OIDC_CLIENTS": json.dumps(CLIENTS), "NODE_ENV": "test"}
    with log.open("wb") as out:
        proc = subprocess.Popen([node, str(SCRIPT)], env=env, stdout=out, stderr=subprocess.STDOUT)
    provider = OpenIdProvider(f"http://127.0.0.1:{port}", keys_file, proc, log)
    try:
        wait_ready(provider)
        yield provider
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("oidc")
    (path / "keys.json").write_text(json.dumps({"keys": [private_jwk()]}))
    return path


@pytest.fixture(scope="module")
def provider(workdir: Path) -> Iterator[OpenIdProvider]:
    with start_provider(workdir, workdir / "keys.json") as running:
        yield running


def authenticator(provider: OpenIdProvider, workdir: Path, **env: str) -> Authenticator:
    """Configured as a deployment would be: the issuer URL (and the audience), nothing else."""
    settings = GatewaySettings.from_env({"DETECTFLOW_HOME": str(workdir), "DETECTFLOW_OIDC_ISSUER": provider.issuer,
                                         "DETECTFLOW_JWT_AUDIENCE": AUDIENCE, **env})
    return Authenticator.from_settings(settings)


def test_provider_tokens_are_accepted_with_discovery_only(provider: OpenIdProvider, workdir: Path) -> None:
    auth = authenticator(provider, workdir)
    assert auth.keys is not None and getattr(auth.keys, "jwks_uri", "").startswith(provider.issuer)
    token = provider.token(CLIENTS[0], "detect:write results:read")
    header, claims = jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "RS256" and header["kid"] in provider.jwks_kids()
    assert claims["iss"] == provider.issuer and claims["aud"] == AUDIENCE and claims["exp"] - claims["iat"] == 600
    principal = asyncio.run(auth.authenticate(f"Bearer {token}"))
    assert (principal.tenant, principal.subject) == ("acme", "acme-batch")
    assert principal.scopes == frozenset({"detect:write", "results:read"})
    principal.require("detect:write")


def test_key_rotation_is_followed_without_a_restart(provider: OpenIdProvider, workdir: Path) -> None:
    auth = authenticator(provider, workdir, DETECTFLOW_JWKS_REFRESH_MIN_S="0")
    assert auth.keys is not None
    before = provider.token(CLIENTS[0], "results:read")
    asyncio.run(auth.authenticate(f"Bearer {before}"))
    loads = auth.keys.loads
    new_kid = provider.rotate()
    after = provider.token(CLIENTS[0], "results:read")
    assert jwt.get_unverified_header(after)["kid"] == new_kid
    assert asyncio.run(auth.authenticate(f"Bearer {after}")).tenant == "acme"
    assert auth.keys.loads == loads + 1  # the unknown kid made it fetch the JWKS again, once
    assert asyncio.run(auth.authenticate(f"Bearer {before}")).tenant == "acme"  # the old key is still published
    assert auth.keys.loads == loads + 1


def test_a_token_from_another_issuer_is_refused(provider: OpenIdProvider, workdir: Path) -> None:
    auth = authenticator(provider, workdir)
    # Another provider with the very same keys: the signature verifies, so the issuer check is what refuses.
    with start_provider(workdir, provider.keys_file) as other:
        foreign = other.token(CLIENTS[0], "detect:write")
        with pytest.raises(Problem) as info:
            auth.verify(foreign)
        assert (info.value.status, info.value.extra["reason"]) == (401, "wrong_issuer")
    # And a token that is not from a provider at all, signed with a key nobody published.
    forged = jwt.encode({"iss": provider.issuer, "aud": AUDIENCE, "sub": "x", "tenant": "acme",
                         "iat": int(time.time()), "exp": int(time.time()) + 60},
                        RSAAlgorithm.from_jwk(json.dumps(private_jwk())), algorithm="RS256",
                        headers={"kid": "made-up"})
    with pytest.raises(Problem) as info:
        auth.verify(forged)
    assert info.value.extra["reason"] == "unknown_key"
