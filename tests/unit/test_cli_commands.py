"""From the command line to the work: what `detectflow models|tenants|dlq|jobs` hand to the registry, Kafka's
admin calls and the dead letters (stand-ins for the services), through infra/cli/ and the *_cmd modules."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from infra.cli import main


class FakeRegistry:
    """Records each registry call and answers with a routing state."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def _state(self) -> SimpleNamespace:
        return SimpleNamespace(model="m", production=1, canary=None, canary_percent=0.0, guardrail=True, shadow=None,
                               previous=[], versions=[1, 2])

    def __getattr__(self, name: str) -> Any:
        if name not in ("promote", "canary", "shadow", "rollback", "retire", "purge"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> SimpleNamespace:
            self.calls.append((name, args, kwargs))
            return self._state()
        return call


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    import infra.models_cmd

    fake = FakeRegistry()
    monkeypatch.setattr(infra.models_cmd, "connect_registry", lambda settings: fake)
    return fake


@pytest.mark.parametrize(("argv", "call"), [
    (["promote", "m", "2", "--no-wait", "--force", "--actor", "ops"],
     ("promote", ("m", 2), {"actor": "ops", "force": True})),
    (["canary", "m", "2", "12.5", "--no-guardrail", "--no-wait", "--actor", "ops"],
     ("canary", ("m", 2, 12.5), {"actor": "ops", "force": False, "guardrail": False})),
    (["shadow", "m", "2", "--actor", "ops"], ("shadow", ("m", 2), {"actor": "ops"})),
    (["shadow", "m", "OFF", "--actor", "ops"], ("shadow", ("m", None), {"actor": "ops"})),
    (["rollback", "m", "--reason", "slow", "--actor", "ops"],
     ("rollback", ("m",), {"actor": "ops", "reason": "slow"})),
    (["retire", "m", "1", "--actor", "ops"], ("retire", ("m", 1), {"actor": "ops"})),
    (["purge", "m", "--actor", "ops"], ("purge", ("m",), {"actor": "ops"})),
])
def test_a_models_command_reaches_the_registry_with_its_arguments(
        argv: list[str], call: tuple[str, tuple[Any, ...], dict[str, Any]], registry: FakeRegistry,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", *argv]) == 0
    assert registry.calls == [call]
    out = capsys.readouterr().out
    assert ("purged from the registry" if argv[0] == "purge" else "m: production v1; servable v1,v2") in out


def test_a_models_command_with_a_bad_version_exits_2(registry: FakeRegistry,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "shadow", "m", "two"]) == 2  # shadow takes a number or off
    assert "detectflow models:" in capsys.readouterr().err and registry.calls == []
    assert main(["models", "retire", "m", "two"]) == 2  # a usage error: VERSION is an integer
    assert registry.calls == []


@pytest.fixture
def tenant_admin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    import infra.tenants_cmd

    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setenv("DETECTFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("DETECTFLOW_KAFKA_USERS_DIR", str(tmp_path / "kafka"))
    monkeypatch.setattr(infra.tenants_cmd, "kafka_connection", lambda stream, user: {"user": user})
    monkeypatch.setattr(infra.tenants_cmd, "provision_tenant",
                        lambda *a, **k: calls.append(("provision", a, k)) or {})
    monkeypatch.setattr(infra.tenants_cmd, "revoke_tenant",
                        lambda *a, **k: calls.append(("revoke", a, k)) or True)
    return calls


def test_tenants_create_rotate_show_secret_and_revoke(tenant_admin: list[Any], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    creds = tmp_path / "kafka" / "tenant-acme.json"
    assert main(["tenants", "create", "acme"]) == 0
    first = json.loads(creds.read_text())["password"]
    assert first not in capsys.readouterr().out  # not without --show-secret
    assert main(["tenants", "create", "acme", "--show-secret"]) == 0
    assert f"sasl.password={first}" in capsys.readouterr().out  # the same credential: create is idempotent
    assert main(["tenants", "create", "acme", "--rotate"]) == 0
    assert json.loads(creds.read_text())["password"] != first
    assert [c[0] for c in tenant_admin] == ["provision"] * 3 and tenant_admin[-1][1][0] == {"user": "admin"}
    assert main(["tenants", "revoke", "acme", "--delete-topic"]) == 0
    assert tenant_admin[-1][0] == "revoke" and tenant_admin[-1][2] == {"delete_topics": True}
    assert not creds.exists() and "topics deleted" in capsys.readouterr().out
    assert main(["tenants", "revoke", "acme"]) == 0 and tenant_admin[-1][2] == {"delete_topics": False}
    assert main(["tenants", "create", "a.b"]) == 2  # not a tenant name


def test_dlq_commands_reach_the_dead_letters(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import infra.dlq_cmd

    calls: list[tuple[Any, ...]] = []

    class FakeDeadLetters:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def topics(self, name: str | None = None) -> list[str]:
            calls.append(("topics", name))
            return ["p.detect.batch.submitted.dlq"]

        def read(self, topic: str, *, since_ms: int | None = None) -> tuple[list[Any], dict[int, int], dict[int, int]]:
            calls.append(("read", topic, since_ms))
            return [], {}, {}

        def redrive(self, topic: str, *, since_ms: int | None = None, dry_run: bool = False) -> list[Any]:
            calls.append(("redrive", topic, since_ms, dry_run))
            return []

    monkeypatch.setattr(infra.dlq_cmd, "DeadLetters", FakeDeadLetters)
    monkeypatch.setattr(infra.dlq_cmd.AvroSerde, "from_url", classmethod(lambda cls, *a: None))
    monkeypatch.setattr(infra.dlq_cmd, "kafka_connection", lambda stream: {})
    monkeypatch.setattr(infra.dlq_cmd, "parse_since", lambda raw: 1000 if raw == "2h" else pytest.fail(raw))
    assert main(["dlq", "redrive", "--topic", "detect.batch.submitted", "--since", "2h", "--dry-run"]) == 0
    assert calls == [("topics", "detect.batch.submitted"), ("redrive", "p.detect.batch.submitted.dlq", 1000, True)]
    assert "would redrive 0 letter(s)" in capsys.readouterr().err
    calls.clear()
    assert main(["dlq", "list"]) == 0
    assert calls == [("topics", None), ("read", "p.detect.batch.submitted.dlq", None)]


def test_jobs_submit_needs_a_token_outside_dev_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DETECTFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("DETECTFLOW_AUTH_DEV", raising=False)
    assert main(["jobs", "submit", str(tmp_path)]) == 2
    assert "pass --token" in capsys.readouterr().err
