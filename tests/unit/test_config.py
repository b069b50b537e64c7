from __future__ import annotations

import ast
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

import config
from config import (
    GatewaySettings,
    LifecycleSettings,
    Login,
    MinioCredentials,
    PipelineSettings,
    Settings,
    SettingsError,
    StackSettings,
    StreamSettings,
    Versions,
)
from config.show import render


def test_defaults_bind_loopback_under_home(tmp_path: Path) -> None:
    s = StackSettings.from_env({"DETECTFLOW_HOME": str(tmp_path)})
    assert s.home == tmp_path.resolve()
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.registry_url == "https://127.0.0.1:8081/apis/ccompat/v7"
    assert s.log_dir == tmp_path.resolve() / "logs"


def test_ports_and_heaps_are_configurable(tmp_path: Path) -> None:
    s = StackSettings.from_env({"DETECTFLOW_HOME": str(tmp_path), "DETECTFLOW_KAFKA_PORT": "19092",
                                "DETECTFLOW_CASSANDRA_HEAP": "1g"})
    assert s.kafka_bootstrap == "127.0.0.1:19092"
    assert s.cassandra_heap == "1g"


@pytest.mark.parametrize("name,value", [("KAFKA_PORT", "abc"), ("KAFKA_PORT", "70000"), ("KAFKA_HEAP", "lots")])
def test_bad_values_are_refused(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        StackSettings.from_env({"DETECTFLOW_HOME": str(tmp_path), f"DETECTFLOW_{name}": value})


def test_minio_credentials_are_generated_once_private_and_not_in_repr(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "minio.json"
    first = MinioCredentials.load_or_create(path)
    again = MinioCredentials.load_or_create(path)
    assert first == again
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.secret_key not in repr(first)
    assert len(first.secret_key) >= 32


# ---- config/: strict parsing, every field settable, direct construction, secrets ---------------------------------

ALL_CLASSES = (StackSettings, Versions, StreamSettings, LifecycleSettings, PipelineSettings, GatewaySettings)


@pytest.mark.parametrize(("variable", "value", "wanted"), [
    ("DETECTFLOW_MAX_BATCH", "2.9", "valid integer"),
    ("DETECTFLOW_MAX_BATCH", "-5", "greater than or equal to 1"),
    ("DETECTFLOW_MAX_BATCH", "inf", "valid integer"),
    ("DETECTFLOW_MAX_BATCH", "nan", "valid integer"),
    ("DETECTFLOW_MAX_BATCH", "", "valid integer"),
    ("DETECTFLOW_FLUSH_TIMEOUT_S", "inf", "finite number"),
    ("DETECTFLOW_FLUSH_TIMEOUT_S", "nan", "finite number"),
    ("DETECTFLOW_FLUSH_TIMEOUT_S", "-1", "greater than 0"),
    ("DETECTFLOW_EXACTLY_ONCE", "ture", "valid boolean"),
    ("DETECTFLOW_ONLINE_EXACTLY_ONCE", "2", "valid boolean"),
    ("DETECTFLOW_COMPRESSION", "brotli", "'lz4'"),
    ("DETECTFLOW_KAFKA_PORT", "0", "greater than or equal to 1"),
    ("DETECTFLOW_GATEWAY_PORT", "65536", "less than or equal to 65535"),
    ("DETECTFLOW_CASSANDRA_HEAP", "1t", "512m or 1g"),
    ("DETECTFLOW_NMS_IOU", "1.5", "less than or equal to 1"),
    ("DETECTFLOW_SCORE_THRESHOLD", "-0.1", "greater than or equal to 0"),
    ("DETECTFLOW_CASSANDRA_HOSTS", "a,,b", "comma-separated"),
    ("DETECTFLOW_STATE_DIR", "  ", "empty"),
    ("DETECTFLOW_REVIEW_RETENTION_DAYS", "12", "one of"),
    ("DETECTFLOW_REPLY_PARTITION", "-2", "greater than or equal to -1"),
    ("DETECTFLOW_KAFKA_VERSION", "", "at least 1 character"),
])
def test_a_bad_value_is_refused_naming_its_variable_and_what_is_wanted(
        tmp_path: Path, variable: str, value: str, wanted: str) -> None:
    env = {"DETECTFLOW_HOME": str(tmp_path), variable: value}
    with pytest.raises(SettingsError, match=re.escape(variable)) as caught:
        GatewaySettings.from_env(env)
    assert wanted in str(caught.value)


def _sample(cls: type[Settings], name: str, baseline: Any, tmp_path: Path) -> tuple[str, Any, dict[str, str]]:
    """A valid value for field ``name`` other than ``baseline``: (its variable's text, the value it parses to,
    the other variables it needs)."""
    companions = {"hs256_secret_file": {"DETECTFLOW_AUTH_DEV": "true"},
                  "allow_hs256": {"DETECTFLOW_AUTH_DEV": "true"},
                  "tls_cert": {"DETECTFLOW_GATEWAY_TLS_KEY": str(tmp_path / "other.key")},
                  "tls_key": {"DETECTFLOW_GATEWAY_TLS_CERT": str(tmp_path / "other.crt")}}.get(name, {})
    special: dict[str, tuple[str, Any]] = {
        "review_retention_days": ("90", 90),
        "compression": ("zstd", "zstd"),
        "oidc_issuer": ("https://idp.example.com/realm", "https://idp.example.com/realm"),
        "cassandra_hosts": ("db1, db2", ("db1", "db2")),
        "home": (str(tmp_path / "home2"), (tmp_path / "home2").resolve()),
    }
    if name in special:
        return (*special[name], companions)
    if name.endswith("_heap"):
        return "2G", "2g", companions
    info = cls.model_fields[name]
    kind = type(baseline)
    if isinstance(baseline, bool):
        return ("false", False, companions) if baseline else ("true", True, companions)
    if isinstance(baseline, int):
        high = next((m.le for m in info.metadata if getattr(m, "le", None) is not None), None)
        value = baseline - 1 if high is not None and baseline + 1 > high else baseline + 1
        return str(value), value, companions
    if isinstance(baseline, float):
        value = baseline / 2 if baseline >= 0.5 else baseline + 0.5
        return repr(value), value, companions
    if baseline is None or isinstance(baseline, Path):
        path = tmp_path / f"{name}.file"
        path.write_text("x")  # some (a CA bundle) must exist
        return str(path), path, companions
    assert kind is str, (cls.__name__, name, baseline)
    return baseline + "-x", baseline + "-x", companions


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_field_is_settable_through_its_variable(tmp_path: Path, cls: type[Settings]) -> None:
    base = {"DETECTFLOW_HOME": str(tmp_path / "home")}
    baseline = cls.from_env(base)
    nested = {n for n, f in cls.model_fields.items() if isinstance(f.annotation, type)
              and issubclass(f.annotation, Settings)}
    assert set(cls.env_fields()) == set(cls.model_fields) - nested
    for name, variable in cls.env_fields().items():
        assert variable.startswith("DETECTFLOW_")
        assert cls.model_fields[name].description, f"{cls.__name__}.{name} has no doc"
        old = getattr(baseline, name)
        raw, expected, companions = _sample(cls, name, old, tmp_path)
        assert expected != old, (name, old)
        got = getattr(cls.from_env({**base, **companions, variable: raw}), name)
        assert got == expected, f"{variable}={raw!r} gave {cls.__name__}.{name}={got!r}, not {expected!r}"


def test_today_s_variable_names_keep_working(tmp_path: Path) -> None:
    names = {v for cls in ALL_CLASSES for v in cls.env_fields().values()}
    assert {"DETECTFLOW_KAFKA_BOOTSTRAP", "DETECTFLOW_CASSANDRA_KEYSPACE", "DETECTFLOW_SCORE_THRESHOLD",
            "DETECTFLOW_GATEWAY_HOST", "DETECTFLOW_GATEWAY_PORT", "DETECTFLOW_GATEWAY_TLS_CERT",
            "DETECTFLOW_JWT_ISSUER", "DETECTFLOW_JWT_AUDIENCE", "DETECTFLOW_JWT_MAX_LIFETIME_S",
            "DETECTFLOW_OIDC_TIMEOUT_S", "DETECTFLOW_OIDC_MAX_BYTES", "DETECTFLOW_OIDC_CA_BUNDLE",
            "DETECTFLOW_MODELS_DIR", "DETECTFLOW_MINIO_SECRETS_DIR", "DETECTFLOW_TOPIC_PREFIX"} <= names
    env = {"DETECTFLOW_HOME": str(tmp_path), "DETECTFLOW_KAFKA_PORT": "19092", "DETECTFLOW_HOST": "10.0.0.5",
           "DETECTFLOW_MAX_ONLINE_LAG": "100"}
    gw = GatewaySettings.from_env(env)
    # Derived defaults follow the settings they derive from.
    assert gw.pipeline.stream.bootstrap == "10.0.0.5:19092"
    assert gw.pipeline.stream.state_dir == tmp_path.resolve() / "run"
    assert gw.pipeline.models_dir == tmp_path.resolve() / "models"
    assert (gw.host, gw.max_online_lag_hard) == ("10.0.0.5", 400)


def test_direct_construction_never_reads_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for cls in ALL_CLASSES:
        for variable in cls.env_fields().values():
            monkeypatch.setenv(variable, "garbage")
    stream = StreamSettings(max_batch=4)
    assert (stream.max_batch, stream.max_wait_ms, stream.compression) == (4, 50, "lz4")
    assert StackSettings(home=tmp_path).kafka_port == 9092
    assert Versions() == Versions.model_construct()
    assert LifecycleSettings().guard_min_samples == 20
    pipeline = PipelineSettings(stream=stream, models_dir=tmp_path)
    assert (pipeline.exactly_once, pipeline.lifecycle) == (True, LifecycleSettings())
    assert GatewaySettings(pipeline=pipeline).port == 8080
    # from_env() with no mapping is the one reader of os.environ.
    monkeypatch.setenv("DETECTFLOW_MAX_BATCH", "7")
    with pytest.raises(SettingsError, match="DETECTFLOW_MAX_WAIT_MS='garbage'"):
        StreamSettings.from_env()
    for cls in ALL_CLASSES:
        for variable in cls.env_fields().values():
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("DETECTFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("DETECTFLOW_MAX_BATCH", "7")
    assert StreamSettings.from_env().max_batch == 7
    assert StreamSettings.from_env({"DETECTFLOW_HOME": str(tmp_path)}).max_batch == 64


def test_settings_are_immutable_and_replace_validates() -> None:
    s = StreamSettings()
    with pytest.raises(ValidationError):
        s.max_batch = 3  # type: ignore[misc]
    assert s.replace(max_batch=3).max_batch == 3 and s.max_batch == 64
    with pytest.raises(SettingsError, match="DETECTFLOW_MAX_BATCH"):
        s.replace(max_batch=0)
    with pytest.raises(TypeError, match="max_batches"):
        s.replace(max_batches=3)


def test_secrets_are_masked_in_repr_and_in_config_show(tmp_path: Path) -> None:
    login = Login(username="gateway", password="hunter2-login")  # noqa: S106
    assert "hunter2" not in repr(login)
    url = "https://registry-user:hunter2-url@registry.example.com/apis/ccompat/v7"
    env = {"DETECTFLOW_HOME": str(tmp_path), "DETECTFLOW_REGISTRY_URL": url}
    stream = StreamSettings.from_env(env)
    assert stream.registry_url == url  # the client gets the real value ...
    assert "hunter2" not in repr(stream) and "registry-user:***@registry.example.com" in repr(stream)
    shown = render(env)
    assert "hunter2" not in shown and "registry-user:***@registry.example.com" in shown
    with pytest.raises(SettingsError) as caught:
        StreamSettings.from_env({**env, "DETECTFLOW_REGISTRY_URL": "https://u:hunter2@r.example.com",
                                 "DETECTFLOW_MAX_BATCH": "x"})
    assert "hunter2" not in str(caught.value)


def test_config_show_lists_every_field_with_its_variable_value_and_source(tmp_path: Path) -> None:
    env = {"DETECTFLOW_HOME": str(tmp_path), "DETECTFLOW_MAX_BATCH": "9", "DETECTFLOW_CASSANDRA_HOSTS": "a,b"}
    rows = {}
    for line in render(env).splitlines():
        if line.startswith("  "):
            _name, variable, source, value = line.split(None, 3)
            rows.setdefault(variable, []).append((source, value))
    for cls in ALL_CLASSES:
        assert f"[{cls.__name__}]" in render(env)
        for variable in cls.env_fields().values():
            assert variable in rows, variable
    assert rows["DETECTFLOW_MAX_BATCH"] == [("env", "9")]
    assert rows["DETECTFLOW_CASSANDRA_HOSTS"] == [("env", "a,b")]
    assert rows["DETECTFLOW_MAX_WAIT_MS"] == [("default", "50")]
    assert rows["DETECTFLOW_HOME"] == [("env", str(tmp_path.resolve()))]


def test_detectflow_config_show_prints_it_and_refuses_a_bad_value(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from infra.cli import main

    monkeypatch.setenv("DETECTFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("DETECTFLOW_STAGE_MAX_BATCH", "3")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"stage_max_batch +DETECTFLOW_STAGE_MAX_BATCH +env +3\n", out)
    monkeypatch.setenv("DETECTFLOW_STAGE_MAX_BATCH", "2.9")
    assert main(["config", "show"]) == 2
    assert "DETECTFLOW_STAGE_MAX_BATCH='2.9'" in capsys.readouterr().err


def test_config_imports_nothing_else_of_detectflow() -> None:
    ours = {"infra", "stream", "processors", "schemas", "gateway", "model_store", "imaging"}
    for path in sorted(Path(config.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & ours, f"{path.name} imports {names}"
