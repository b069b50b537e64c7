"""The model registry: versions in the models bucket, metadata and routing in Cassandra, changes on `models`.

Layout of the models bucket (Triton's repository, in object storage)::

    <model>/config.json                 the model's config: decoder family, input, outputs, batch limit, classes
    <model>/<version>/model.onnx
    <model>/<version>/sha256            hex sha256 of model.onnx (checked on every download)
    <model>/<version>/provenance.json   source package, converter and its version, opset
    <model>/<version>/metrics.json      mAP and latency on the evaluation set (from the release gate)
    <model>/<version>/gate.json         the release gate's report

Files are written before the Cassandra row that makes a version exist, so a version row always has
its files. The routing state (``model_store.serving.routing.Routing``) lives in ``model_routing`` and changes
only by compare-and-set on its revision; after each change the full state is published on the
compacted `models` topic (key: the model name) for the serving processes, and an audit event is
written (tenant ``_platform``, which no API tenant can name).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from model_store.serving.catalog import ModelNotFound
from model_store.serving.config import CONFIG_FILE, MODEL_FILE, ModelConfig, ModelConfigError
from model_store.serving.routing import Routing, RoutingError, report_key
from model_store.tools.convert import sha256_file as file_sha256
from schemas import events
from schemas.names import MODEL_NAME_RULE, valid_model_name
from stream.cassandra import AUDIT_INSERT, AUDIT_TTL_S, audit_row, connect, timestamp_ms
from stream.errors import TransientError
from stream.kafka import kafka_connection, kafka_producer
from stream.objectstore import MINIO_ERRORS, minio_client
from stream.serde import AvroSerde

log = logging.getLogger(__name__)

PLATFORM_TENANT = "_platform"  # audit partition of registry changes; API tenants cannot start with '_'
MAX_MODEL_BYTES = 2 * 1024 * 1024 * 1024


class RegistryError(RuntimeError):
    """A registry command failed or is not allowed; the message says why."""


class GateRefused(RegistryError):
    """The release gate refused a push outright (the model cannot be served at all)."""

    def __init__(self, message: str, report: Mapping[str, Any]):
        super().__init__(message)
        self.report = dict(report)


def comparable_config(config: ModelConfig | Mapping[str, Any]) -> dict[str, Any]:
    """What every version of one model must share (Triton: one config per model, many versions)."""
    data = config.to_dict() if isinstance(config, ModelConfig) else dict(config)
    data = {k: v for k, v in data.items() if k not in ("name", "provenance", "max_batch")}
    return json.loads(json.dumps(data))  # tuples and lists compare alike


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: int
    sha256: str
    size_bytes: int
    provenance: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    gate_status: str = "PASSED"
    gate_report: Mapping[str, Any] = field(default_factory=dict)
    pushed_by: str = ""
    pushed_at_ms: int = 0
    retired: bool = False


# ---------------------------------------------------------------------------------------------- Cassandra
class RegistryStore:
    """model_versions, model_routing, shadow_agreement and the audit_log rows of registry changes."""

    def __init__(self, session: Any, timeout_s: float = 10.0, audit_ttl_s: int | None = None):

        self._s = session
        self._timeout = timeout_s
        self._audit_ttl = AUDIT_TTL_S if audit_ttl_s is None else audit_ttl_s
        p = session.prepare
        self._routing = p("SELECT production, canary, canary_percent, shadow, previous, versions, guardrail, revision "
                          "FROM model_routing WHERE model_name = ?")
        self._routing_new = p(
            "INSERT INTO model_routing (model_name, production, canary, canary_percent, shadow, previous, versions, "
            "guardrail, revision, updated_by, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS")
        self._routing_cas = p(
            "UPDATE model_routing SET production = ?, canary = ?, canary_percent = ?, shadow = ?, previous = ?, "
            "versions = ?, guardrail = ?, revision = ?, updated_by = ?, updated_at = ? WHERE model_name = ? "
            "IF revision = ?")
        self._models = p("SELECT model_name FROM model_routing")
        self._delete = [p("DELETE FROM model_versions WHERE model_name = ?"),
                        p("DELETE FROM model_routing WHERE model_name = ?"),
                        p("DELETE FROM shadow_agreement WHERE model_name = ?")]
        self._versions = p("SELECT * FROM model_versions WHERE model_name = ?")
        self._version = p("SELECT * FROM model_versions WHERE model_name = ? AND version = ?")
        self._insert_version = p(
            "INSERT INTO model_versions (model_name, version, sha256, size_bytes, provenance, metrics, gate_status, "
            "gate_report, pushed_by, pushed_at, retired) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, false) IF NOT EXISTS")
        self._retire = p("UPDATE model_versions SET retired = true WHERE model_name = ? AND version = ?")
        self._audit = p(AUDIT_INSERT)
        self._audit_read = p("SELECT event_time, subject, action, resource, outcome, status, detail FROM audit_log "
                             "WHERE tenant = ? AND day = ?")
        self._agreement = p("SELECT * FROM shadow_agreement WHERE model_name = ?")
        self._agree = p(
            "UPDATE shadow_agreement SET images = images + ?, matched = matched + ?, "
            "production_only = production_only + ?, shadow_only = shadow_only + ?, "
            "score_delta_micros = score_delta_micros + ?, production_latency_micros = production_latency_micros + ?, "
            "shadow_latency_micros = shadow_latency_micros + ? "
            "WHERE model_name = ? AND production_version = ? AND shadow_version = ? AND class_name = ?")

    def _execute(self, stmt: Any, params: Sequence[Any]) -> Any:
        from stream.cassandra import execute  # the Cassandra driver: only where the registry is used

        return execute(self._s, stmt, tuple(params), timeout_s=self._timeout)

    # routing
    def routing(self, model: str) -> Routing | None:
        row = self._execute(self._routing, (model,)).one()
        if row is None:
            return None
        return Routing(model=model, production=row.production, canary=row.canary,
                       canary_percent=float(row.canary_percent or 0.0), shadow=row.shadow,
                       previous=tuple(row.previous or ()), versions=tuple(row.versions or ()),
                       guardrail=row.guardrail if row.guardrail is not None else True, revision=int(row.revision or 0))

    def compare_and_set(self, new: Routing, expected_revision: int | None, actor: str) -> bool:
        """Store ``new`` (revision bumped) if the stored revision is still ``expected_revision`` (None: no row)."""

        now = dt.datetime.now(dt.UTC)
        fields = (new.production, new.canary, float(new.canary_percent), new.shadow, list(new.previous),
                  list(new.versions), new.guardrail, new.revision + 1, actor, now)
        if expected_revision is None:
            rs = self._execute(self._routing_new, (new.model, *fields))
        else:
            rs = self._execute(self._routing_cas, (*fields, new.model, expected_revision))
        return bool(rs.was_applied)

    def models(self) -> list[str]:
        return sorted(r.model_name for r in self._execute(self._models, ()))

    def close(self) -> None:
        self._s.cluster.shutdown()

    # versions
    def versions(self, model: str) -> list[VersionInfo]:
        return sorted((_version_info(r) for r in self._execute(self._versions, (model,))), key=lambda v: v.version)

    def version(self, model: str, version: int) -> VersionInfo | None:
        row = self._execute(self._version, (model, version)).one()
        return _version_info(row) if row is not None else None

    def insert_version(self, info: VersionInfo) -> bool:

        rs = self._execute(self._insert_version, (
            info.model, info.version, info.sha256, info.size_bytes, json.dumps(dict(info.provenance)),
            json.dumps(dict(info.metrics)), info.gate_status, json.dumps(dict(info.gate_report)), info.pushed_by,
            dt.datetime.fromtimestamp(info.pushed_at_ms / 1000, dt.UTC)))
        return bool(rs.was_applied)

    def retire(self, model: str, version: int) -> None:
        self._execute(self._retire, (model, version))

    def delete_model(self, model: str) -> None:
        """Every row of a model (its versions, routing and shadow agreement); the audit log stays."""
        for stmt in self._delete:
            self._execute(stmt, (model,))

    # audit
    def audit(self, event: Mapping[str, Any], day: str) -> None:

        self._execute(self._audit, audit_row(event, self._audit_ttl, day))

    def audit_events(self, day: str) -> list[dict[str, Any]]:
        rows = self._execute(self._audit_read, (PLATFORM_TENANT, day))
        return [{"subject": r.subject, "action": r.action, "resource": r.resource, "outcome": r.outcome,
                 "status": r.status, "detail": r.detail} for r in rows]

    # shadow agreement
    def add_agreement(self, model: str, production: int, shadow: int, class_name: str, *, images: int = 0,
                      matched: int = 0, production_only: int = 0, shadow_only: int = 0, score_delta: float = 0.0,
                      production_ms: float = 0.0, shadow_ms: float = 0.0) -> None:
        self._execute(self._agree, (images, matched, production_only, shadow_only, int(score_delta * 1e6),
                                    int(production_ms * 1000), int(shadow_ms * 1000), model, production, shadow,
                                    class_name))

    def agreement(self, model: str) -> list[dict[str, Any]]:
        return [{"production_version": r.production_version, "shadow_version": r.shadow_version,
                 "class_name": r.class_name, "images": r.images or 0, "matched": r.matched or 0,
                 "production_only": r.production_only or 0, "shadow_only": r.shadow_only or 0,
                 "score_delta_sum": (r.score_delta_micros or 0) / 1e6,
                 "production_ms_sum": (r.production_latency_micros or 0) / 1000,
                 "shadow_ms_sum": (r.shadow_latency_micros or 0) / 1000}
                for r in self._execute(self._agreement, (model,))]


def _version_info(row: Any) -> VersionInfo:

    return VersionInfo(model=row.model_name, version=row.version, sha256=row.sha256, size_bytes=row.size_bytes or 0,
                       provenance=json.loads(row.provenance or "{}"), metrics=json.loads(row.metrics or "{}"),
                       gate_status=row.gate_status or "PASSED", gate_report=json.loads(row.gate_report or "{}"),
                       pushed_by=row.pushed_by or "", pushed_at_ms=timestamp_ms(row.pushed_at) or 0,
                       retired=bool(row.retired))


# ---------------------------------------------------------------------------------------------- MinIO
class ModelObjects:
    """The models bucket: version files up, verified downloads into a local repository (the serving cache)."""

    def __init__(self, client: Any, bucket: str = "models"):
        self._c = client
        self.bucket = bucket

    def _put(self, key: str, data: bytes, content_type: str = "application/json") -> None:
        self._c.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)

    def _get(self, key: str, max_bytes: int = 1 << 20) -> bytes | None:

        try:
            resp = self._c.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return None
            raise
        try:
            return resp.read(max_bytes + 1)[: max_bytes + 1]
        finally:
            resp.close()
            resp.release_conn()

    def ensure_bucket(self) -> None:
        if not self._c.bucket_exists(self.bucket):
            self._c.make_bucket(self.bucket)

    def config(self, model: str) -> dict[str, Any] | None:
        data = self._get(f"{model}/{CONFIG_FILE}")
        return json.loads(data) if data is not None else None

    def put_config(self, model: str, config: Mapping[str, Any]) -> None:
        self._put(f"{model}/{CONFIG_FILE}", json.dumps(dict(config), indent=2).encode())

    def put_version(self, model: str, version: int, model_file: Path, sha256: str, docs: Mapping[str, Any]) -> None:
        prefix = f"{model}/{version}/"
        self._c.fput_object(self.bucket, prefix + MODEL_FILE, str(model_file), content_type="application/octet-stream")
        self._put(prefix + "sha256", (sha256 + "\n").encode(), "text/plain")
        for name, doc in docs.items():
            self._put(prefix + f"{name}.json", json.dumps(doc, indent=2, default=str).encode())

    def delete_model(self, model: str) -> None:

        doomed = [DeleteObject(o.object_name) for o in self._c.list_objects(self.bucket, prefix=f"{model}/",
                                                                           recursive=True)]
        for error in self._c.remove_objects(self.bucket, doomed):
            raise RegistryError(f"cannot delete {error.name}: {error.message}")

    def download(self, model: str, version: int, root: Path) -> Path:
        """``<root>/<model>/<version>/{model.onnx, config.json}``, atomically; the sha256 must match."""
        dest = Path(root) / model / str(version)
        if (dest / MODEL_FILE).is_file() and (dest / CONFIG_FILE).is_file():
            return dest
        sha = self._get(f"{model}/{version}/sha256")
        config = self.config(model)
        provenance = self._get(f"{model}/{version}/provenance.json")
        if sha is None or config is None:
            raise RegistryError(f"model {model!r} version {version} is not in bucket {self.bucket}")
        expected = sha.decode().strip()
        Path(root, model).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=Path(root) / model))
        try:
            self._c.fget_object(self.bucket, f"{model}/{version}/{MODEL_FILE}", str(tmp / MODEL_FILE))
            actual = file_sha256(tmp / MODEL_FILE)
            if actual != expected:
                raise RegistryError(f"model {model!r} version {version}: downloaded sha256 {actual} != {expected}")
            if provenance is not None:
                config = {**config, "provenance": json.loads(provenance)}
            config = {**config, "name": model}
            ModelConfig.from_dict(config).save(tmp / CONFIG_FILE)
            try:
                os.rename(tmp, dest)  # atomic; another process may have won the race, which is fine
            except OSError:
                if not (dest / MODEL_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


# ---------------------------------------------------------------------------------------------- Kafka
class ModelEventLog:
    """Publishes routing states and READY/LOAD_FAILED reports on `models`, and audit events on `audit`."""

    def __init__(self, kafka: Mapping[str, Any], registry_url: str, prefix: str = "", flush_timeout_s: float = 15.0,
                 *, registry_ca: Path | None = None):

        self.topic = f"{prefix}models"
        self.audit_topic = f"{prefix}audit"
        self._serde = AvroSerde.from_url(registry_url, registry_ca)
        self._producer = kafka_producer(kafka, linger_ms=0)
        self._timeout = flush_timeout_s

    def _send(self, topic: str, key: str, event_name: str, value: dict[str, Any]) -> None:
        errors: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        self._producer.produce(topic, key=key.encode(), value=self._serde.encode(topic, event_name, value),
                               on_delivery=delivered)
        if self._producer.flush(self._timeout) or errors:
            raise RegistryError(f"could not publish on {topic}: {errors or 'flush timed out'}")

    def publish_state(self, routing: Routing, action: str, version: int, *, actor: str, sha256: str | None = None,
                      reason: str | None = None) -> dict[str, Any]:
        event = events.model_event(model_name=routing.model, version=version, action=action, **routing.event_fields(),
                                   sha256=sha256, actor=actor, reason=reason, at=int(time.time() * 1000))
        self._send(self.topic, routing.model, "ModelEvent", event)
        return event

    def report(self, model: str, version: int, action: str, instance: str, reason: str | None = None) -> None:
        event = events.model_event(model_name=model, version=version, action=action, actor=instance, reason=reason,
                                   at=int(time.time() * 1000))
        self._send(self.topic, report_key(model, version, instance), "ModelEvent", event)

    def audit(self, event: Mapping[str, Any]) -> None:
        self._send(self.audit_topic, event["tenant"], "AuditEvent", dict(event))


def audit_event(subject: str, action: str, resource: str, *, outcome: str = "success", status: int = 200,
                detail: str | None = None) -> dict[str, Any]:
    return events.audit_event(event_id=str(uuid.uuid4()), tenant=PLATFORM_TENANT, subject=subject, action=action,
                              resource=resource, outcome=outcome, status=status, detail=detail,
                              event_time=int(time.time() * 1000))


# ---------------------------------------------------------------------------------------------- commands
GateRunner = Callable[[Path, ModelConfig, "VersionInfo | None"], dict[str, Any]]


@dataclass(frozen=True)
class PushOutcome:
    version: int
    created: bool
    gate_status: str
    report: Mapping[str, Any]


class Registry:
    """The registry commands. Every change: compare-and-set in Cassandra, publish on `models`, audit."""

    def __init__(self, store: RegistryStore, objects: ModelObjects, events: ModelEventLog):
        self.store = store
        self.objects = objects
        self.events = events

    # ---- audit ------------------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, resource: str, *, outcome: str = "success", status: int = 200,
              detail: str | None = None) -> None:
        from stream.cassandra import utc_day  # the Cassandra driver: only where the registry is used

        event = audit_event(actor, action, resource, outcome=outcome, status=status, detail=detail)
        self.store.audit(event, utc_day(event["event_time"] / 1000))
        self.events.audit(event)

    # ---- reads ------------------------------------------------------------------------------------------
    def routing(self, model: str) -> Routing:
        r = self.store.routing(model)
        if r is None:
            raise RegistryError(f"model {model!r} is not in the registry")
        return r

    def listing(self) -> list[tuple[Routing, list[VersionInfo]]]:
        return [(self.routing(m), self.store.versions(m)) for m in self.store.models()]

    # ---- push -------------------------------------------------------------------------------------------
    def push(self, model: str, source: Path, *, actor: str, gate: GateRunner) -> PushOutcome:
        if not valid_model_name(model):
            raise RegistryError(f"invalid model name {model!r}: {MODEL_NAME_RULE}")
        source = Path(source)
        model_file = source / MODEL_FILE
        if not model_file.is_file():
            raise RegistryError(f"{source} has no {MODEL_FILE}")
        size = model_file.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise RegistryError(f"{model_file} is {size} bytes; the limit is {MAX_MODEL_BYTES}")
        try:
            config = ModelConfig.load(source / CONFIG_FILE)
        except ModelConfigError as exc:
            raise RegistryError(str(exc)) from exc
        config = replace(config, name=model)
        sha = file_sha256(model_file)
        existing = self.store.versions(model)
        for info in existing:
            if info.sha256 == sha and not info.retired:
                return PushOutcome(info.version, False, info.gate_status, info.gate_report)
        stored = self.objects.config(model)
        if stored is not None and comparable_config(stored) != comparable_config(config):
            raise RegistryError(f"{source / CONFIG_FILE} differs from the config of model {model!r} (decoder, "
                                f"input, outputs or classes); a different config is a different model name")
        routing = self.store.routing(model)
        production = None
        if routing is not None and routing.production is not None:
            production = self.store.version(model, routing.production)
        try:
            report = gate(model_file, config, production)
        except GateRefused as exc:
            self.audit(actor, "models.push", model, outcome="rejected", status=422,
                       detail=f"release gate refused {sha[:12]}: {exc}")
            raise
        status = "PASSED" if report.get("passed") else "FAILED"
        metrics = report.get("metrics", {})
        provenance = {**config.to_dict()["provenance"], "onnx_sha256": sha}
        if stored is None:
            self.objects.put_config(model, {k: v for k, v in config.to_dict().items() if k != "provenance"})
        version = max((i.version for i in existing), default=0) + 1
        while True:
            self.objects.put_version(model, version, model_file, sha, {"provenance": provenance, "metrics": metrics,
                                                                       "gate": report})
            info = VersionInfo(model, version, sha, size, provenance, metrics, status, report, actor,
                               int(time.time() * 1000))
            if self.store.insert_version(info):
                break
            version += 1  # another push took this number between our read and our insert
        state = self._transition(model, lambda r: r.pushed(version), "PUSHED", version, actor, sha256=sha,
                                 detail=f"sha256 {sha[:12]}, gate {status}")
        log.info("pushed %s v%s (gate %s); production is v%s", model, version, status, state.production)
        return PushOutcome(version, True, status, report)

    # ---- routing commands ------------------------------------------------------------------------------
    def promote(self, model: str, version: int, *, actor: str, force: bool = False) -> Routing:
        detail = self._gate_check(model, version, force, actor, "promote")
        return self._transition(model, lambda r: r.promoted(version), "PROMOTED", version, actor, detail=detail)

    def canary(self, model: str, version: int, percent: float, *, actor: str, force: bool = False,
               guardrail: bool = True) -> Routing:
        detail = self._gate_check(model, version, force, actor, "canary")
        extra = f"{percent:g}% of traffic" + ("" if guardrail else ", guardrails off (A/B)")
        return self._transition(model, lambda r: r.with_canary(version, percent, guardrail), "CANARY", version, actor,
                                detail=f"{extra}; {detail}" if detail else extra)

    def shadow(self, model: str, version: int | None, *, actor: str) -> Routing:
        return self._transition(model, lambda r: r.with_shadow(version), "SHADOW",
                                version if version is not None else self.routing(model).shadow or 0, actor,
                                detail="shadow off" if version is None else None)

    def rollback(self, model: str, *, actor: str, reason: str | None = None,
                 only_canary: int | None = None) -> Routing:
        """Abort the canary, or restore the previous production version. ``only_canary``: abort only if
        that version is still the canary (the guardrail's rollback must not undo a person's later change)."""
        def step(r: Routing) -> Routing:
            if only_canary is not None and r.canary != only_canary:
                raise RoutingError(f"version {only_canary} is no longer the canary")
            return r.rolled_back()
        before = self.routing(model)
        version = before.canary if before.canary is not None else before.production or 0
        return self._transition(model, step, "ROLLED_BACK", version, actor, reason=reason, detail=reason)

    def retire(self, model: str, version: int, *, actor: str) -> Routing:
        state = self._transition(model, lambda r: r.retired(version), "RETIRED", version, actor)
        self.store.retire(model, version)
        return state

    def purge(self, model: str, *, actor: str) -> None:
        """Remove a model from the registry entirely (files and rows); audited. Serving processes that
        still hold it keep their loaded copy until they restart; nothing routes to it any more."""
        if self.store.routing(model) is None and not self.store.versions(model):
            raise RegistryError(f"model {model!r} is not in the registry")
        self.objects.delete_model(model)
        self.store.delete_model(model)
        self.audit(actor, "models.purged", model)

    def close(self) -> None:
        self.store.close()

    def republish(self, model: str, *, actor: str) -> Routing:
        """Publish the stored state again (after a publish that failed midway)."""
        state = self.routing(model)
        self.events.publish_state(state, "PUSHED", state.production or 0, actor=actor, reason="republished")
        return state

    # ---- internals --------------------------------------------------------------------------------------
    def _gate_check(self, model: str, version: int, force: bool, actor: str, action: str) -> str | None:
        info = self.store.version(model, version)
        if info is None or info.retired:
            raise RegistryError(f"model {model!r} has no servable version {version}")
        if info.gate_status == "PASSED":
            return None
        failed = ", ".join(c["name"] for c in info.gate_report.get("checks", []) if not c.get("passed")) or "gate"
        if not force:
            self.audit(actor, f"models.{action}", f"{model}/{version}", outcome="denied", status=409,
                       detail=f"release gate failed: {failed}")
            raise RegistryError(f"version {version} of {model!r} failed its release gate ({failed}); "
                                f"--force overrides (audited)")
        return f"FORCED past a failing release gate ({failed})"

    def _transition(self, model: str, step: Callable[[Routing], Routing], action: str, version: int, actor: str,
                    *, sha256: str | None = None, reason: str | None = None, detail: str | None = None) -> Routing:
        for _ in range(10):
            current = self.store.routing(model)
            base = current if current is not None else Routing(model=model)
            try:
                new = step(base)
            except RoutingError as exc:
                self.audit(actor, f"models.{action.lower()}", f"{model}/{version}", outcome="rejected", status=409,
                           detail=str(exc))
                raise RegistryError(str(exc)) from exc
            if self.store.compare_and_set(new, current.revision if current is not None else None, actor):
                stored = replace(new, revision=new.revision + 1)
                self.events.publish_state(stored, action, version, actor=actor, sha256=sha256, reason=reason)
                self.audit(actor, f"models.{action.lower()}", f"{model}/{version}", detail=detail)
                return stored
        raise RegistryError(f"model {model!r} changed concurrently ten times; try again")


def fetcher(objects: ModelObjects, root: Path) -> Callable[[str, int], Path]:
    """The catalog's ``fetch``: a registry version into the local repository; errors in the stage's terms."""


    def fetch(model: str, version: int) -> Path:
        try:
            return objects.download(model, version, root)
        except RegistryError as exc:
            raise ModelNotFound(str(exc)) from exc
        except ModelConfigError as exc:
            raise ModelNotFound(f"model {model!r} version {version}: {exc}") from exc
        except MINIO_ERRORS as exc:
            raise TransientError(f"model registry unavailable: {type(exc).__name__}: {exc}") from exc
    return fetch


def connect_registry(settings: Any, role: str = "registry") -> Registry:
    """The registry on the local stack (``settings``: config.PipelineSettings), as ``role`` in MinIO and
    Cassandra; only the ``registry`` role may write model files and version rows."""

    objects = ModelObjects(minio_client(settings, role), settings.lifecycle.models_bucket)
    objects.ensure_bucket()
    return Registry(RegistryStore(connect(settings.stream, role)), objects,
                    ModelEventLog(kafka_connection(settings.stream, role), settings.stream.registry_url,
                                  settings.stream.topic_prefix, registry_ca=settings.stream.tls_ca_file))
