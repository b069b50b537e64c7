"""TLS for MinIO, the schema registry and the gateway: settings, server contexts, and clients that verify."""

from __future__ import annotations

import http.server
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from config import GatewaySettings, SettingsError, StackSettings, StreamSettings
from gateway.app import server_tls
from infra.stack.base import http_ok
from infra.stack.minio import MinioService, https_pool
from infra.stack.pki import Pki, issue
from infra.stack.registry import RegistryService
from stream.serde import registry_config


def _gateway(tmp_path: Path, **env: str) -> GatewaySettings:
    return GatewaySettings.from_env({"DETECTFLOW_HOME": str(tmp_path), "DETECTFLOW_AUTH_DEV": "true",
                                     **{f"DETECTFLOW_{k}": v for k, v in env.items()}})


def test_gateway_serves_https_by_default_with_the_project_certificate(tmp_path: Path) -> None:
    gw = _gateway(tmp_path)
    tls = StackSettings.from_env({"DETECTFLOW_HOME": str(tmp_path)}).tls_dir
    assert (gw.insecure_http, gw.tls_cert, gw.tls_key) == (False, tls / "gateway.crt", tls / "gateway.key")
    assert gw.base_url == "https://127.0.0.1:8080"


def test_gateway_plain_http_only_with_the_explicit_flag(tmp_path: Path) -> None:
    gw = _gateway(tmp_path, GATEWAY_INSECURE_HTTP="true")
    assert (gw.insecure_http, gw.tls_cert, gw.tls_key) == (True, None, None)
    assert gw.base_url == "http://127.0.0.1:8080"
    assert server_tls(gw) is None


@pytest.mark.parametrize("env, names", [
    ({"GATEWAY_INSECURE_HTTP": "maybe"}, "GATEWAY_INSECURE_HTTP"),
    ({"GATEWAY_INSECURE_HTTP": "true", "GATEWAY_TLS_CERT": "/x.crt", "GATEWAY_TLS_KEY": "/x.key"},
     "GATEWAY_INSECURE_HTTP"),
    ({"GATEWAY_TLS_CERT": "/x.crt"}, "GATEWAY_TLS_KEY"),
    ({"GATEWAY_TLS_KEY": "/x.key"}, "GATEWAY_TLS_CERT"),
])
def test_gateway_tls_settings_are_parsed_strictly(tmp_path: Path, env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        _gateway(tmp_path, **env)


def test_missing_gateway_certificate_is_refused_naming_the_variables(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="DETECTFLOW_GATEWAY_TLS_CERT"):
        server_tls(_gateway(tmp_path))


def test_empty_ca_file_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="TLS_CA_FILE"):
        StreamSettings.from_env({"DETECTFLOW_HOME": str(tmp_path), "DETECTFLOW_TLS_CA_FILE": " "})


@pytest.fixture
def https_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS server with the gateway's server context and a project-CA certificate; (url, CA file)."""
    pki = Pki(tmp_path / "tls")
    leaf = issue(pki, "gateway")
    context = server_tls(_gateway(tmp_path, GATEWAY_TLS_CERT=str(leaf.cert), GATEWAY_TLS_KEY=str(leaf.key)))
    assert context is not None

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", pki.ca_cert
    finally:
        server.shutdown()
        server.server_close()


def test_probe_verifies_the_certificate_against_the_project_ca(https_server: tuple[str, Path],
                                                                tmp_path: Path) -> None:
    url, ca = https_server
    assert http_ok(url + "/health", ca_file=ca) == (True, "HTTP 200")
    other = Pki(tmp_path / "other")
    issue(other, "someone")
    ok, detail = http_ok(url + "/health", ca_file=other.ca_cert)
    assert not ok and "CERTIFICATE_VERIFY_FAILED" in detail


def test_minio_pool_verifies_against_the_ca_and_refuses_without_one(https_server: tuple[str, Path],
                                                                     tmp_path: Path) -> None:
    import urllib3

    url, ca = https_server
    assert https_pool(ca).request("GET", url + "/minio/health/ready").status == 200
    other = Pki(tmp_path / "other")
    issue(other, "someone")
    with pytest.raises(urllib3.exceptions.MaxRetryError, match="CERTIFICATE_VERIFY_FAILED"):
        https_pool(other.ca_cert, retries=0).request("GET", url + "/minio/health/ready")
    with pytest.raises(SettingsError, match="TLS_CA_FILE"):
        https_pool(None)


def test_registry_client_config_carries_the_ca() -> None:
    assert registry_config("https://r/apis", Path("/ca.crt")) == {
        "url": "https://r/apis", "timeout": 10, "ssl.ca.location": "/ca.crt"}
    assert "ssl.ca.location" not in registry_config("https://r/apis")


def test_minio_prepare_puts_its_certificate_in_the_certs_dir(tmp_path: Path) -> None:
    from cryptography import x509

    settings = StackSettings.from_env({"DETECTFLOW_HOME": str(tmp_path)})
    svc = MinioService(settings)
    svc.prepare(lambda _msg: None)
    certs = svc.certs_dir
    leaf = x509.load_pem_x509_certificate((certs / "public.crt").read_bytes())
    ca = x509.load_pem_x509_certificate(settings.tls_ca_file.read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert (certs / "CAs" / "detectflow-ca.crt").read_bytes() == settings.tls_ca_file.read_bytes()
    assert stat.S_IMODE((certs / "private.key").stat().st_mode) == 0o600
    assert svc.address.startswith("https://")
    assert ["--certs-dir", str(certs)] == svc.command()[svc.command().index("--certs-dir"):][:2]


def test_registry_serves_https_only(tmp_path: Path) -> None:
    settings = StackSettings.from_env({"DETECTFLOW_HOME": str(tmp_path)})
    props = dict(arg[2:].split("=", 1) for arg in RegistryService(settings).command() if arg.startswith("-D"))
    leaf = Pki(settings.tls_dir).leaf("registry")
    assert props["quarkus.tls.key-store.pem.registry.cert"] == str(leaf.cert)
    assert props["quarkus.tls.key-store.pem.registry.key"] == str(leaf.key)
    assert props["quarkus.http.ssl-port"] == str(settings.registry_port)
    assert props["quarkus.http.insecure-requests"] == "disabled"
    assert settings.registry_url.startswith("https://")


def test_client_contexts_never_turn_verification_off(https_server: tuple[str, Path]) -> None:
    from infra.jobs_cmd import client_tls

    _url, ca = https_server
    context = client_tls(ca)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
