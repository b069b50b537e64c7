"""Attacks on the stack as it ships: each one is refused by the service that owns the data.

The copy-source attack (a pre-signed upload PUT carrying ``x-amz-copy-source`` copied another tenant's
image into the attacker's upload) and the least-privilege MinIO roles behind its fix; Kafka's TLS, SCRAM
and ACLs. Cassandra's are in test_cassandra_security.py, the OpenID provider in test_oidc.py.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from gateway_kit import Gateway, start_stack_with_gateway
from minio import Minio
from minio.error import S3Error
from object_kit import minio_as, root_minio
from stream_kit import kafka_admin

from config import PipelineSettings, StackSettings
from infra.stack.minio_access import ROLE_RIGHTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw(stack: StackSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The gateway alone (no pipeline): every attack here is refused before anything is submitted."""
    yield from start_stack_with_gateway(stack, f"sec{uuid.uuid4().hex[:6]}.", tmp_path_factory.mktemp("sec-logs"),
                                        roles=("gateway",))


def _grant(gw: Gateway, tenant: str, length: int) -> dict[str, str]:
    r = gw.call("POST", "/v1/uploads", tenant,
                json={"files": [{"content_type": "image/jpeg", "content_length": length}]})
    assert r.status_code == 201, r.text
    return r.json()["uploads"][0]


def test_copy_source_through_an_upload_url_is_refused_for_any_source(gw: Gateway, stack: StackSettings,
                                                                      sample_jpeg: bytes) -> None:
    victim, attacker = f"victim-{uuid.uuid4().hex[:8]}", f"attacker-{uuid.uuid4().hex[:8]}"
    sha = hashlib.sha256(sample_jpeg).hexdigest()
    root = root_minio(stack)
    # Images as the gateway stores them: the victim's, and one of the attacker's own.
    for tenant in (victim, attacker):
        root.put_object("uploads", f"{tenant}/{sha}", io.BytesIO(sample_jpeg), len(sample_jpeg),
                        content_type="image/jpeg", metadata={"detectflow-submitted": "true"})
    sources = {"another tenant's image": f"/uploads/{victim}/{sha}",
               "the same tenant's image": f"/uploads/{attacker}/{sha}",
               "an object that does not exist": f"/uploads/{victim}/{'0' * 64}"}
    for what, source in sources.items():
        up = _grant(gw, attacker, 1)
        r = requests.put(up["url"], data=b"x", headers={**up["headers"], "x-amz-copy-source": source}, timeout=30,
                         verify=gw.verify)
        # 403 whatever the source: no copy, and no existence oracle (a 404 would say what exists).
        assert r.status_code == 403 and "AccessDenied" in r.text, (what, r.status_code, r.text[:300])
        detect = gw.call("POST", "/v1/detect", attacker, json={"image": {"upload_id": up["upload_id"]}})
        assert detect.status_code == 404 and detect.json()["code"] == "NOT_FOUND", (what, detect.text)


def test_an_upload_that_is_not_the_signed_one_is_refused_and_audited(gw: Gateway, stack: StackSettings,
                                                                       sample_jpeg: bytes) -> None:
    tenant = f"mismatch-{uuid.uuid4().hex[:8]}"
    up = _grant(gw, tenant, len(sample_jpeg))
    key = f"{tenant}/uploads/{up['upload_id']}"
    # Another writer puts an object at the upload's key with the old marker (the gateway signed another one).
    root_minio(stack).put_object("uploads", key, io.BytesIO(sample_jpeg), len(sample_jpeg), content_type="image/jpeg",
                                 metadata={"detectflow-submitted": "true"})
    r = gw.call("POST", "/v1/detect", tenant, json={"image": {"upload_id": up["upload_id"]}})
    assert r.status_code == 422 and r.json()["code"] == "UPLOAD_MISMATCH", r.text
    job = gw.call("POST", "/v1/jobs", tenant, json={"items": [{"upload_id": up["upload_id"]}]})
    assert job.status_code == 422 and job.json()["code"] == "UPLOAD_MISMATCH", job.text
    deadline = time.monotonic() + 30  # audit events are written off the request path
    refused: list[dict[str, object]] = []
    while len(refused) < 2 and time.monotonic() < deadline:
        audit = gw.call("GET", "/v1/audit", tenant, headers=gw.auth(tenant, ("admin",)))
        assert audit.status_code == 200, audit.text
        refused = [e for e in audit.json()["events"] if e.get("detail") == "UPLOAD_MISMATCH"]
        time.sleep(0.2)
    assert {(e["action"], e["status"]) for e in refused} == {("detect", 422), ("jobs.create", 422)}, refused


def test_the_signed_upload_is_accepted(gw: Gateway, sample_jpeg: bytes) -> None:
    tenant = f"honest-{uuid.uuid4().hex[:8]}"
    up = _grant(gw, tenant, len(sample_jpeg))
    assert requests.put(up["url"], data=sample_jpeg, headers=up["headers"], timeout=30,
                        verify=gw.verify).status_code == 200
    # No pipeline runs here: the call passes the upload check and waits for a result that cannot come.
    r = gw.call("POST", "/v1/detect", tenant, json={"image": {"upload_id": up["upload_id"]}},
                params={"timeout_ms": 1})
    assert r.status_code == 202, r.text


def _client(stack: StackSettings, role: str) -> Minio:
    creds = PipelineSettings.from_env().minio_credentials(role)
    return minio_as(stack, creds)


def _denied(call: object) -> bool:
    try:
        call()  # type: ignore[operator]
    except S3Error as exc:
        return exc.code == "AccessDenied"
    return False


def test_each_minio_role_can_do_only_what_it_does(stack: StackSettings, sample_jpeg: bytes) -> None:
    key = f"roles-{uuid.uuid4().hex[:8]}/img"
    root = root_minio(stack)
    root.put_object("uploads", key, io.BytesIO(sample_jpeg), len(sample_jpeg))
    try:
        for role in ROLE_RIGHTS:
            c = _client(stack, role)
            can_read_uploads = "s3:GetObject" in ROLE_RIGHTS[role].get("uploads", ())
            assert _denied(lambda c=c: c.stat_object("uploads", key)) is not can_read_uploads, role
            can_write_models = "s3:PutObject" in ROLE_RIGHTS[role].get("models", ())
            probe = f"probe-{role}"
            put = _denied(lambda c=c, probe=probe: c.put_object("models", probe, io.BytesIO(b"x"), 1))
            assert put is not can_write_models, role
            assert _denied(lambda c=c, probe=probe: c.make_bucket(probe)), role  # only the stack makes buckets
        assert _denied(lambda: _client(stack, "gateway-signer").get_object("uploads", key))
        assert _denied(lambda: _client(stack, "preprocess").remove_object("uploads", key))
        assert _denied(lambda: _client(stack, "gateway").get_object("models", "yolov4-tiny/config.json"))
    finally:
        root.remove_object("uploads", key)
        root.remove_object("models", "probe-registry")


# ---------------------------------------------------------------------------------------------- Kafka


def _kafka_refused(conf: dict[str, object], topic: str = "detections") -> str | None:
    """The error a producer gets for one record on ``topic`` (None if it was written)."""
    from confluent_kafka import Producer

    errors: list[str] = []
    p = Producer({**conf, "message.timeout.ms": 8000, "socket.timeout.ms": 5000, "log_level": 0})
    p.produce(topic, b"x", on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
    left = p.flush(15)
    return errors[0] if errors else ("not delivered" if left else None)


def test_kafka_refuses_plaintext_unauthenticated_and_unknown_ca_clients(stack: StackSettings,
                                                                          tmp_path: Path) -> None:
    from infra.stack.pki import Pki, issue

    admin = kafka_admin(stack)
    assert _kafka_refused({"bootstrap.servers": stack.kafka_bootstrap}) is not None  # plaintext
    assert _kafka_refused({**admin, "sasl.password": "not-the-password"}) is not None  # wrong secret
    other = Pki(tmp_path / "other-ca")
    issue(other, "someone", sans=(), server=False, client=True)
    assert _kafka_refused({**admin, "ssl.ca.location": str(other.ca_cert)}) is not None  # broker unverifiable
    # The internal listener wants a client certificate of the project CA.
    internal = {"bootstrap.servers": f"{stack.host}:{stack.kafka_internal_port}", "security.protocol": "SSL",
                "ssl.ca.location": str(stack.tls_dir / "ca.crt")}
    assert _kafka_refused(internal) is not None
    assert _kafka_refused({**internal, "ssl.certificate.location": str(other.leaf("someone").cert),
                           "ssl.key.location": str(other.leaf("someone").key)}) is not None


def test_a_stage_principal_writes_and_reads_only_its_own_topics(stack: StackSettings) -> None:
    from confluent_kafka import Consumer, TopicPartition

    from config import StreamSettings, kafka_client
    from infra.stack.kafka_access import deprovision, provision
    from stream.topics import lane_topic

    prefix = f"acl{uuid.uuid4().hex[:6]}."
    admin = kafka_admin(stack)
    provision(admin, prefix)
    try:
        scan = kafka_client(StreamSettings.from_env(), "scan")
        assert _kafka_refused(scan, lane_topic(prefix, "online", "scanned")) is None  # its output
        for foreign in (f"{prefix}models", lane_topic(prefix, "online", "preprocessed"), f"{prefix}audit",
                        f"{prefix}detections.shadow"):
            assert "AUTHORIZATION_FAILED" in (_kafka_refused(scan, foreign) or ""), foreign
        # The recorder audits TENANT_MISMATCH refusals (scan may not): `audit` yes, `models` no.
        recorder = kafka_client(StreamSettings.from_env(), "recorder")
        assert _kafka_refused(recorder, f"{prefix}audit") is None
        assert "AUTHORIZATION_FAILED" in (_kafka_refused(recorder, f"{prefix}models") or "")
        consumer = Consumer({**scan, "group.id": f"{prefix}detectflow.scan", "log_level": 0})
        try:
            # The topic exists (provisioned above); to a principal that may not describe it, it does not.
            with pytest.raises(Exception, match=r"AUTHORIZ|Unknown partition"):
                consumer.get_watermark_offsets(TopicPartition(lane_topic(prefix, "online", "inferred"), 0), timeout=10)
        finally:
            consumer.close()
    finally:
        deprovision(admin, prefix)


def test_objects_are_encrypted_at_rest_in_every_bucket(stack: StackSettings, sample_jpeg: bytes) -> None:
    from infra.stack.minio import BUCKETS

    root = root_minio(stack)
    key = f"sse-{uuid.uuid4().hex[:8]}/probe"
    for bucket in BUCKETS:
        root.put_object(bucket, key, io.BytesIO(sample_jpeg), len(sample_jpeg))  # no encryption asked for
        try:
            stat = root.stat_object(bucket, key)
            assert stat.metadata.get("x-amz-server-side-encryption") == "AES256", (bucket, dict(stat.metadata))
            assert root.get_object(bucket, key).read() == sample_jpeg  # decrypted on read
        finally:
            root.remove_object(bucket, key)


# ----------------------------------------------------------------- TLS: MinIO, the schema registry, the gateway


def _tls_ports(stack: StackSettings, gw: Gateway) -> dict[str, tuple[str, int]]:
    """What serves TLS -> (the certificate's name, its port)."""
    from urllib.parse import urlsplit

    return {"minio": ("minio", stack.minio_port), "registry": ("registry", stack.registry_port),
            "registry management": ("registry", stack.registry_management_port),
            "gateway": ("gateway", urlsplit(gw.url).port or 0)}


def _peer_certificate(port: int, ca_file: Path) -> dict[str, object]:
    """The certificate served on ``port``, verified (chain and hostname) against ``ca_file``."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        return tls.getpeercert()  # type: ignore[return-value]


def test_minio_registry_and_gateway_serve_certificates_of_the_project_ca(gw: Gateway, stack: StackSettings,
                                                                         tmp_path: Path) -> None:
    import ssl

    from infra.stack.pki import Pki, issue

    other = Pki(tmp_path / "other-ca")
    issue(other, "impostor")
    for what, (name, port) in _tls_ports(stack, gw).items():
        cert = _peer_certificate(port, stack.tls_ca_file)
        subject = {k: v for rdn in cert["subject"] for k, v in rdn}  # type: ignore[union-attr]
        assert subject["commonName"] == name, (what, cert)
        assert ("IP Address", "127.0.0.1") in cert["subjectAltName"], (what, cert)  # type: ignore[operator]
        with pytest.raises(ssl.SSLCertVerificationError):  # a client that trusts another CA stops here
            _peer_certificate(port, other.ca_cert)


def test_clients_trusting_another_ca_are_refused(gw: Gateway, stack: StackSettings, tmp_path: Path) -> None:
    import urllib3
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.common._httpx_compat import httpx  # the HTTP client it uses

    from infra.stack.minio import https_pool
    from infra.stack.pki import Pki, issue
    from stream.serde import registry_config

    other = Pki(tmp_path / "other-ca")
    issue(other, "impostor")
    root = stack.minio_credentials()
    impostor_minio = Minio(stack.minio_endpoint, access_key=root.access_key, secret_key=root.secret_key, secure=True,
                           http_client=https_pool(other.ca_cert, retries=0))
    with pytest.raises(urllib3.exceptions.MaxRetryError, match="CERTIFICATE_VERIFY_FAILED"):
        impostor_minio.list_buckets()
    assert root_minio(stack).bucket_exists("uploads")  # the same call, verified against the project CA
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        SchemaRegistryClient(registry_config(stack.registry_url, other.ca_cert)).get_subjects()
    assert isinstance(SchemaRegistryClient(registry_config(stack.registry_url, stack.tls_ca_file)).get_subjects(),
                      list)
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(gw.url + "/livez", timeout=5, verify=str(other.ca_cert))
    assert gw.call("GET", "/livez").status_code == 200


def test_plain_http_is_refused_by_minio_the_registry_and_the_gateway(gw: Gateway, stack: StackSettings) -> None:
    for what, (_name, port) in _tls_ports(stack, gw).items():
        url = f"http://127.0.0.1:{port}/"
        try:
            r = requests.get(url, timeout=5)
        except requests.ConnectionError:
            continue  # the TLS port closed the plain-text connection
        # Or a plain-text error page that names the mistake; never a served answer.
        assert r.status_code == 400, (what, r.status_code, r.text[:200])
