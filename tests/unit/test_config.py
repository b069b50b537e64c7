from __future__ import annotations

import stat
from pathlib import Path

import pytest

from config import MinioCredentials, SettingsError, StackSettings


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
