"""stream/objectstore.py: MinIO clients built in one place, and no lower layer reaching into infra/ for them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import urllib3

from config import MinioCredentials, SettingsError
from stream.objectstore import MINIO_ERRORS, minio_at

ROOT = Path(__file__).resolve().parents[2]


def test_a_client_speaks_verified_tls_with_bounded_waits(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("read when a connection is made")
    client = minio_at("127.0.0.1:9000", MinioCredentials("key", "secret"), ca, region="eu-1", connect_s=1.5,
                      read_s=7.0, maxsize=4, retries=1)
    http = client._http  # the pool the client sends every request through
    assert http.connection_pool_kw["cert_reqs"] == "CERT_REQUIRED" and http.connection_pool_kw["ca_certs"] == str(ca)
    timeout = http.connection_pool_kw["timeout"]
    assert (timeout.connect_timeout, timeout.read_timeout) == (1.5, 7.0)
    assert http.connection_pool_kw["maxsize"] == 4 and http.connection_pool_kw["retries"].total == 1
    assert client._base_url.is_https and client._base_url.region == "eu-1"


def test_a_client_without_a_ca_is_refused() -> None:
    with pytest.raises(SettingsError, match="DETECTFLOW_TLS_CA_FILE"):
        minio_at("127.0.0.1:9000", MinioCredentials("key", "secret"), None)


def test_an_unreachable_minio_is_one_of_the_minio_errors() -> None:
    assert isinstance(urllib3.exceptions.MaxRetryError(None, "/", None), MINIO_ERRORS)  # type: ignore[arg-type]
    assert isinstance(ConnectionRefusedError(), MINIO_ERRORS)


def test_no_lower_layer_imports_infra_but_its_settings() -> None:
    offenders = []
    for package in ("stream", "processors", "gateway", "model_store"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                              if (n == "infra" or n.startswith("infra.")) and n != "config"]
    assert offenders == []
