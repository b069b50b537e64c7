"""Apache Kafka 4.x in KRaft mode: one process that is both broker and controller.

The broker is resolved from Maven Central (``infra/maven/kafka-pom.xml``) into
``opt/kafka/lib`` and started as ``java -cp lib/* kafka.Kafka server.properties``;
no release tarball, no shell scripts.

Secured by default: SASL_SSL (SCRAM-SHA-512) for clients, mutual TLS for the broker's own listeners,
ACLs for everything (infra/stack/kafka_access.py). Topic auto-creation is off: every topic is declared
with its partitions and configs (stream/topics.py).

Clients must raise their own limits together with the broker's:
``message.max.bytes`` on producers (librdkafka) and ``fetch.max.bytes`` /
``max.partition.fetch.bytes`` on consumers, all at least
``settings.kafka_max_message_bytes``.
"""

from __future__ import annotations

import base64
import logging
import secrets
import shutil
from pathlib import Path
from typing import Callable, Sequence

from confluent_kafka import KafkaException

from infra.stack import kafka_access as A
from infra.stack.base import Service, StackError, is_marked, java_binary, mark_installed, run_logged, tcp_open
from infra.stack.kafka_access import ADMIN, BROKER_CN, SCHEMA_REGISTRY_CN, internal_admin
from infra.stack.pki import Pki, issue
from stream.kafka import kafka_admin

POM = Path(__file__).resolve().parent.parent / "maven" / "kafka-pom.xml"

# Record-batch and request headers on top of the largest record the pipeline sends.
FRAMING_MARGIN_BYTES = 64 * 1024

# librdkafka logs every refused connection; a probe of a broker that is still
# starting must stay silent.
_QUIET = logging.getLogger("detectflow.stack.kafka.probe")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def new_cluster_id() -> str:
    """16 random bytes as unpadded base64url (22 chars), as StorageTool expects.

    An id starting with '-' would be parsed as a command-line flag, so draw again.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def maven_binary() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError("mvn (Apache Maven 3.8+) is not on PATH; on Debian: apt-get install -y maven")
    return mvn


class KafkaService(Service):
    name = "kafka"
    depends_on: tuple[str, ...] = ()
    stop_timeout_s = 60.0

    @property
    def address(self) -> str:
        return self.settings.kafka_bootstrap

    # ---- layout ------------------------------------------------------------------
    @property
    def lib_dir(self) -> Path:
        return self.opt / "lib"

    @property
    def marker(self) -> Path:
        return self.opt / ".installed"

    @property
    def log_dirs(self) -> Path:
        return self.data / "kraft-logs"

    @property
    def server_properties(self) -> Path:
        return self.conf / "server.properties"

    @property
    def log4j_config(self) -> Path:
        return self.conf / "log4j2.properties"

    @property
    def cluster_id_file(self) -> Path:
        return self.conf / "cluster.id"

    @property
    def broker_max_message_bytes(self) -> int:
        return self.settings.kafka_max_message_bytes + FRAMING_MARGIN_BYTES

    # ---- install -----------------------------------------------------------------
    def _version_tag(self) -> str:
        return f"kafka_2.13-{self.settings.versions.kafka}"

    def installed(self) -> bool:
        return is_marked(self.marker, self._version_tag())

    def install(self, log: Callable[[str], None]) -> None:
        if not POM.is_file():
            raise StackError(f"missing {POM}")
        # A half-finished copy from an interrupted install must not mix with this one.
        if self.lib_dir.exists():
            for jar in self.lib_dir.glob("*.jar"):
                jar.unlink()
        self.lib_dir.mkdir(parents=True, exist_ok=True)
        run_logged([maven_binary(), "-q", "-B", "-f", str(POM),
                    f"-Dmaven.repo.local={self.settings.cache_dir / 'm2'}",
                    f"-Dkafka.version={self.settings.versions.kafka}",
                    "dependency:copy-dependencies", f"-DoutputDirectory={self.lib_dir}"],
                   log, timeout_s=1800)
        if not any(self.lib_dir.glob("kafka_2.13-*.jar")):
            raise StackError(f"maven finished but {self.lib_dir} has no kafka_2.13 jar")
        mark_installed(self.marker, self._version_tag())

    # ---- configuration -------------------------------------------------------------
    def prepare(self, log: Callable[[str], None]) -> None:
        for d in (self.conf, self.log_dirs):
            d.mkdir(parents=True, exist_ok=True)
        pki = Pki(self.settings.tls_dir)
        # The broker's certificate serves every listener and is its principal on the internal ones.
        issue(pki, "kafka", client=True, common_name=BROKER_CN)
        issue(pki, ADMIN, sans=(), server=False, client=True, common_name=ADMIN)
        issue(pki, SCHEMA_REGISTRY_CN, sans=(), server=False, client=True, common_name=SCHEMA_REGISTRY_CN)
        self.server_properties.write_text(self._server_properties())
        self.log4j_config.write_text(_LOG4J2)
        if (self.log_dirs / "meta.properties").exists():
            return
        cluster_id = self._cluster_id()
        log(f"kafka: formatting {self.log_dirs} (cluster id {cluster_id})")
        run_logged([java_binary(), "-Xmx256m", f"-Dlog4j2.configurationFile={self.log4j_config}",
                    "-cp", f"{self.lib_dir}/*", "kafka.tools.StorageTool", "format",
                    "-t", cluster_id, "-c", str(self.server_properties)],
                   log, timeout_s=300)

    def _cluster_id(self) -> str:
        """The id this state dir was (or will be) formatted with; kept so a re-format reuses it."""
        if self.cluster_id_file.exists():
            return self.cluster_id_file.read_text().strip()
        cluster_id = new_cluster_id()
        self.cluster_id_file.write_text(cluster_id + "\n")
        return cluster_id

    def _server_properties(self) -> str:
        s = self.settings
        host = s.host
        max_bytes = self.broker_max_message_bytes
        pki = Pki(s.tls_dir)
        return f"""\
# Written by infra/stack/kafka.py on every start; edit that file, not this one.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{host}:{s.kafka_controller_port}
# Clients: SCRAM-SHA-512 over TLS. The broker itself (inter-broker, controller) and the stack's bootstrap
# admin: mutual TLS with certificates of the project CA (infra/stack/pki.py).
listeners=CLIENT://{host}:{s.kafka_port},CONTROLLER://{host}:{s.kafka_controller_port},INTERNAL://{host}:{s.kafka_internal_port}
advertised.listeners=CLIENT://{host}:{s.kafka_port},INTERNAL://{host}:{s.kafka_internal_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=INTERNAL
listener.security.protocol.map=CLIENT:SASL_SSL,CONTROLLER:SSL,INTERNAL:SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.client.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location={pki.leaf("kafka").bundle}
ssl.truststore.type=PEM
ssl.truststore.location={pki.ca_cert}
listener.name.internal.ssl.client.auth=required
listener.name.controller.ssl.client.auth=required
ssl.principal.mapping.rules=RULE:^CN=([^,]+),O=detectflow$/$1/,DEFAULT
# Nothing is allowed that no ACL allows (infra/stack/kafka_access.py).
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:{BROKER_CN};User:{ADMIN}
log.dirs={self.log_dirs}

# Single node: every replicated internal topic has one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
# 50 partitions per internal topic (the default) is startup time and file handles for nothing here.
offsets.topic.num.partitions=10
transaction.state.log.num.partitions=10

# Off: every topic is declared (stream/topics.py, infra/stack/minio.py) with its partitions and configs.
auto.create.topics.enable=false
num.partitions=3
group.initial.rebalance.delay.ms=0
# Kafka 4's group coordinator holds each offset commit up to 5 ms to batch its log writes. Every
# stage commits (or commits in its transaction) after every batch and before its next poll, so that
# was 5 ms more per batch loop: a sync commit took 7.6 ms with the default, 2.1 ms with 0.
group.coordinator.append.linger.ms=0

# Images travel inline up to settings.kafka_max_message_bytes.
message.max.bytes={max_bytes}
replica.fetch.max.bytes={max_bytes}
replica.fetch.response.max.bytes={max(max_bytes, 10 * 1024 * 1024)}

# A dev box: keep three days or 1 GiB per partition, whichever comes first.
log.retention.hours=72
log.retention.bytes=1073741824
log.segment.bytes=134217728
log.retention.check.interval.ms=300000

# Two cores: fewer threads than the defaults.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=2
background.threads=4
# The cleaner's dedupe buffer lives on the heap (128 MiB by default).
log.cleaner.dedupe.buffer.size=16777216
log.cleaner.threads=1
"""

    # ---- run -------------------------------------------------------------------------
    def command(self) -> Sequence[str]:
        heap = self.settings.kafka_heap
        return [
            java_binary(),
            f"-Xms{heap}", f"-Xmx{heap}",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-XX:MaxMetaspaceSize=128m", "-XX:ReservedCodeCacheSize=64m",
            # Socket writes from heap buffers go through a per-thread cached direct buffer as
            # large as the biggest message; cap what stays cached.
            "-Djdk.nio.maxCachedBufferSize=262144",
            "-XX:MaxDirectMemorySize=256m",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_config}",
            "-cp", f"{self.lib_dir}/*",
            "kafka.Kafka", str(self.server_properties),
        ]

    def probe(self) -> tuple[bool, str]:
        # A closed port needs no client (and no librdkafka threads and log lines).
        if not tcp_open(self.settings.host, self.settings.kafka_port, timeout_s=0.5):
            return False, "port closed"

        admin = kafka_admin(internal_admin(self.settings), log_level=0, extra={
            "socket.timeout.ms": 2000,
            "socket.connection.setup.timeout.ms": 2000,
            "reconnect.backoff.max.ms": 1000,
            "logger": _QUIET,
        })
        try:
            metadata = admin.list_topics(timeout=2)
        except KafkaException as exc:
            return False, f"metadata: {exc.args[0] if exc.args else exc}"
        if not metadata.brokers:
            return False, "no broker registered yet"
        return True, f"{len(metadata.brokers)} broker(s), {len(metadata.topics)} topic(s), SASL_SSL"

    def after_start(self, log: Callable[[str], None]) -> None:
        A.ensure_users(self.settings)
        admin = A.internal_admin(self.settings)
        n = A.apply_acls(admin, [*A.global_bindings(), *A.bindings("")])
        log(f"  kafka: {len(A.ROLES) + 1} SCRAM principals, {n} ACLs (credentials in {self.settings.kafka_users_dir})")


# Everything goes to stdout, which the service runner appends to logs/kafka.log.
# The request and state-change loggers are chatty at INFO and useful only when debugging.
_LOG4J2 = """\
status = warn
name = detectflow-kafka
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.controller.name = kafka.controller
logger.controller.level = INFO
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = INFO
logger.authorizer.name = kafka.authorizer.logger
# Denials are logged at INFO (grants at DEBUG): every refused request is in logs/kafka.log.
logger.authorizer.level = INFO
logger.network.name = kafka.network
logger.network.level = WARN
"""
