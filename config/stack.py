"""The local stack: where its state lives, its ports and heaps, the versions it installs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Mapping

from pydantic import AfterValidator, BeforeValidator, Field, field_validator

from config.base import EnvPath, OptionalPath, Port, Settings, setting
from config.credentials import MinioCredentials


def _heap(value: str) -> str:
    if not (value[:-1].isdigit() and value[-1:] in ("m", "g")):
        raise ValueError("must look like 512m or 1g")
    return value


# A JVM heap size: digits and m or g (case and surrounding blanks ignored).
Heap = Annotated[str, BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v),
                 AfterValidator(_heap)]
# S3 lifecycle rules count in whole days.
Days = Annotated[int, Field(ge=1)]


class Versions(Settings):
    """Pinned versions of every component the stack installs."""

    kafka: str = setting("4.1.2", doc="Apache Kafka release the stack installs", env="KAFKA_VERSION",
                         min_length=1)
    apicurio: str = setting("3.3.3", doc="Apicurio Registry release", env="APICURIO_VERSION", min_length=1)
    cassandra: str = setting("5.0.6", doc="Apache Cassandra release", env="CASSANDRA_VERSION", min_length=1)
    # MinIO publishes source only; this is the pseudo-version the Go module proxy serves.
    minio: str = setting("v0.0.0-20260212201848-7aac2a2c5b7c", doc="MinIO Go module pseudo-version built from source",
                         env="MINIO_VERSION", min_length=1)


class StackSettings(Settings):
    """Where the local stack lives and how it is reached."""

    home: EnvPath = setting(doc="State directory of the local stack (downloads, data, logs, secrets); "
                                "default ~/.detectflow")
    host: str = setting("127.0.0.1", doc="Address the stack's services bind and clients reach", min_length=1)
    kafka_port: Port = setting(9092, doc="Kafka client listener (SASL_SSL)")
    kafka_controller_port: Port = setting(9093, doc="Kafka KRaft controller listener")
    # The broker's mutual-TLS listener (inter-broker traffic and the stack's own admin bootstrap).
    kafka_internal_port: Port = setting(9094, doc="Kafka mutual-TLS listener (inter-broker, stack admin)")
    registry_port: Port = setting(8081, doc="Schema registry (Apicurio) HTTPS port")
    # Apicurio's management interface (health): its readiness covers the kafkasql journal replay.
    registry_management_port: Port = setting(8082, doc="Schema registry management (health) port")
    cassandra_port: Port = setting(9042, doc="Cassandra native protocol port")
    cassandra_storage_port: Port = setting(7000, doc="Cassandra inter-node storage port")
    minio_port: Port = setting(9000, doc="MinIO S3 API port")
    minio_console_port: Port = setting(9001, doc="MinIO console port")
    clamd_port: Port = setting(3310, doc="clamd TCP port")
    kafka_heap: Heap = setting("384m", doc="Kafka JVM heap (512m, 1g)")
    registry_heap: Heap = setting("192m", doc="Schema registry JVM heap")
    cassandra_heap: Heap = setting("768m", doc="Cassandra JVM heap")
    # Max size of one Kafka record; images travel inline up to this size.
    kafka_max_message_bytes: int = setting(16 * 1024 * 1024, doc="Broker's largest record (bytes)", ge=1)
    clamd_stream_max_bytes: int = setting(32 * 1024 * 1024, doc="Largest stream clamd scans (bytes)", ge=1)
    start_timeout_s: float = setting(240.0, doc="How long `stack up` waits for a service to be ready", gt=0)
    versions: Versions = Field(default_factory=Versions, description="Pinned component versions")
    # The local model repository (converted models, the registry's fetch cache); default <home>/models.
    # The test suite points it at its own folder so that it never serves or changes a user's versions.
    models_root: OptionalPath = setting(None, doc="Local model repository; default <home>/models", env="MODELS_DIR",
                                        empty_unsets=True)
    # Bucket lifecycle (ILM) rules `stack up` sets (infra/stack/minio.py, docs/security.md): whole days.
    uploads_retention_days: Days = setting(7, doc="Days an uploaded image is kept")
    quarantine_retention_days: Days = setting(30, doc="Days a quarantined image is kept")
    # Pre-signed uploads carry a tag until a job claims them; unclaimed ones expire after this many days
    # (must exceed the URL's life plus a grace period: GatewaySettings refuses a longer URL life).
    unclaimed_upload_days: Days = setting(1, doc="Days an unclaimed pre-signed upload is kept")

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.resolve()

    @classmethod
    def _env_base(cls, env: Mapping[str, str]) -> dict[str, Any]:
        return {"home": Path.home() / ".detectflow", "versions": Versions.from_env(env)}

    # Layout of the state directory: everything the stack downloads, builds and
    # stores lives below ``home`` so that a re-run finds it warm.
    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def opt_dir(self) -> Path:
        return self.home / "opt"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def conf_dir(self) -> Path:
        return self.home / "conf"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def secrets_dir(self) -> Path:
        return self.home / "secrets"

    @property
    def models_dir(self) -> Path:
        return self.models_root if self.models_root is not None else self.home / "models"

    @property
    def samples_dir(self) -> Path:
        return self.home / "samples"

    # Client-side addresses.
    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def registry_url(self) -> str:
        return f"https://{self.host}:{self.registry_port}/apis/ccompat/v7"

    @property
    def minio_endpoint(self) -> str:
        return f"{self.host}:{self.minio_port}"

    def minio_credentials(self) -> MinioCredentials:
        """MinIO's root credentials: only `detectflow stack` (and the test suite, as the operator) uses them."""
        return MinioCredentials.load_or_create(self.secrets_dir / "minio.json")

    @property
    def tls_dir(self) -> Path:
        """The project CA and every service's certificate (infra/stack/pki.py), made by `stack up`."""
        return self.secrets_dir / "tls"

    @property
    def kafka_users_dir(self) -> Path:
        """One SCRAM credentials file per Kafka principal (infra/stack/kafka_access.py), made by `stack up`."""
        return self.secrets_dir / "kafka"

    @property
    def minio_roles_dir(self) -> Path:
        """One credentials file per MinIO role (infra/stack/minio_access.py), made by `stack up`."""
        return self.secrets_dir / "minio"

    @property
    def cassandra_roles_dir(self) -> Path:
        """One credentials file per Cassandra role (infra/stack/cassandra_access.py), made by `stack up`."""
        return self.secrets_dir / "cassandra"

    @property
    def tls_ca_file(self) -> Path:
        """The project CA's certificate (infra/stack/pki.py): clients verify the services' certificates with it."""
        return self.tls_dir / "ca.crt"
