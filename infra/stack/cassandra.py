"""Apache Cassandra 5.0, single node, from the Maven Central jars (no tarball, no bin/ scripts).

``install`` resolves ``cassandra-all`` and its dependencies into ``opt/cassandra/lib``;
``command`` is what ``bin/cassandra`` would run, reduced to a small-footprint dev node:
a single node owning every token, loopback only, JMX off, caches and memtables sized
for a 2-core machine that also runs Kafka, the registry, MinIO and clamd.

Clients must log in (PasswordAuthenticator, per-role grants by CassandraAuthorizer: cassandra_access.py)
and the native port speaks TLS only, with a certificate from the project CA (pki.py).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from cassandra import AuthenticationFailed, ProtocolVersion
from cassandra.auth import PlainTextAuthenticator
from cassandra.cluster import DefaultConnection
from cassandra.connection import DefaultEndPoint
from cassandra.protocol import QueryMessage, ResultMessage
from cassandra.query import ConsistencyLevel

from config import Login, SettingsError
from infra.stack.base import Service, StackError, is_marked, java_binary, mark_installed, run_logged, tcp_open
from infra.stack.cassandra_access import admin_credentials, ensure_access
from infra.stack.pki import Leaf, Pki, issue
from stream.cassandra import DRIVER_ERRORS, tls_context

POM = Path(__file__).resolve().parent.parent / "maven" / "cassandra-pom.xml"
MAIN_CLASS = "org.apache.cassandra.service.CassandraDaemon"

# Module access Cassandra needs on Java 17, copied from Cassandra 5.0's conf/jvm17-server.options.
JVM17_MODULE_FLAGS = (
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports", "java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports", "java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports", "java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports", "java.sql/java.sql=ALL-UNNAMED",
    "--add-exports", "java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports", "jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports", "jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports", "jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens", "java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens", "jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens", "java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens", "java.base/java.io=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens", "jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens", "java.base/java.lang=ALL-UNNAMED",
    "--add-opens", "java.base/java.util=ALL-UNNAMED",
    "--add-opens", "java.base/java.nio=ALL-UNNAMED",
    # Netty settings from the same file: Unsafe-backed direct buffers, pre-4.1.75 pool sizing.
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
)

# JVM sizing beyond the heap.  Each bound caps a native pool that otherwise scales with
# the machine (direct memory defaults to the heap size, metaspace is unbounded, the code
# cache reserves 240 MiB); the figures leave headroom over what a dev node uses.
JVM_FOOTPRINT_FLAGS = (
    # 2 cores and a sub-GiB heap: G1's concurrent threads and remembered sets cost more
    # memory than its short pauses are worth here.
    "-XX:+UseSerialGC",
    "-Xss256k",
    "-XX:MaxMetaspaceSize=192m",
    "-XX:ReservedCodeCacheSize=96m",
    "-XX:MaxDirectMemorySize=256m",
    "-XX:+PerfDisableSharedMem",
    # Cassandra's own start-up check: a node that hit OOM may corrupt data if it keeps running.
    "-XX:+ExitOnOutOfMemoryError",
    "-XX:+UseThreadPriorities",
    "-ea",
    "-da:net.openhft...",  # upstream: chronicle's assertions run out of memory by design
    "-Djava.net.preferIPv4Stack=true",
)


class CassandraService(Service):
    name = "cassandra"
    depends_on: tuple[str, ...] = ()
    # SIGTERM runs Cassandra's drain hook (flush memtables, close the commit log); give it time.
    stop_timeout_s = 90.0

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.settings.cassandra_port}"

    @property
    def lib_dir(self) -> Path:
        return self.opt / "lib"

    @property
    def _marker(self) -> Path:
        return self.opt / "installed"

    @property
    def _version(self) -> str:
        return self.settings.versions.cassandra

    @property
    def tmp_dir(self) -> Path:
        return self.data / "tmp"

    @property
    def triggers_dir(self) -> Path:
        return self.conf / "triggers"

    # ---- install -------------------------------------------------------------------
    def installed(self) -> bool:
        jar = self.lib_dir / f"cassandra-all-{self._version}.jar"
        return jar.exists() and is_marked(self._marker, self._version)

    def install(self, log: Callable[[str], None]) -> None:
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError("Maven (mvn) is needed to fetch Cassandra from Maven Central; it is not on PATH")
        # Resolve into a fresh folder and swap it in, so a version change never leaves two
        # cassandra-all jars on the class path and an interrupted install is never half-used.
        staging = self.opt / "lib.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.settings.cache_dir.mkdir(parents=True, exist_ok=True)
        run_logged([mvn, "-q", "-B", "-f", str(POM),
                    f"-Dcassandra.version={self._version}",
                    f"-Dmaven.repo.local={self.settings.cache_dir / 'm2'}",
                    "dependency:copy-dependencies", f"-DoutputDirectory={staging}"],
                   log, cwd=self.settings.cache_dir, timeout_s=1800)
        if not (staging / f"cassandra-all-{self._version}.jar").exists():
            raise StackError(f"Maven finished but cassandra-all-{self._version}.jar is not in {staging}")
        shutil.rmtree(self.lib_dir, ignore_errors=True)
        staging.rename(self.lib_dir)
        mark_installed(self._marker, self._version)

    # ---- configure -------------------------------------------------------------------
    def prepare(self, log: Callable[[str], None]) -> None:
        for d in (self.conf, self.triggers_dir, self.tmp_dir, *self._storage_dirs().values()):
            d.mkdir(parents=True, exist_ok=True)
        self.certificate()
        (self.conf / "cassandra.yaml").write_text(self.render_yaml())
        (self.conf / "logback.xml").write_text(self.render_logback())

    def certificate(self) -> Leaf:
        """The node's TLS certificate (made or renewed as needed); Cassandra re-reads a renewed one on its own."""
        return issue(Pki(self.settings.tls_dir), "cassandra", sans=tuple(dict.fromkeys(("localhost", "127.0.0.1",
                                                                                           self.settings.host))))

    def _storage_dirs(self) -> dict[str, Path]:
        return {
            "data_file_directories": self.data / "data",
            "commitlog_directory": self.data / "commitlog",
            "saved_caches_directory": self.data / "saved_caches",
            "hints_directory": self.data / "hints",
            "cdc_raw_directory": self.data / "cdc_raw",
        }

    def render_yaml(self) -> str:
        """cassandra.yaml in 5.0 key names; the loader rejects unknown keys and unit-less sizes."""
        s = self.settings
        dirs = self._storage_dirs()
        leaf = Pki(s.tls_dir).leaf("cassandra")
        return f"""\
# Written by infra/stack/cassandra.py on every start; edit that file, not this one.
cluster_name: detectflow
num_tokens: 16
allocate_tokens_for_local_replication_factor: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "{s.host}"
listen_address: {s.host}
rpc_address: {s.host}
storage_port: {s.cassandra_storage_port}
native_transport_port: {s.cassandra_port}
start_native_transport: true
# A fresh cluster, never mixed with 4.x nodes: enables the 5.0 storage features (TTLs past 2038).
storage_compatibility_mode: NONE

# Every client logs in as its role; each role is granted only the tables it uses (cassandra_access.py).
authenticator: PasswordAuthenticator
authorizer: CassandraAuthorizer
role_manager: CassandraRoleManager
network_authorizer: AllowAllNetworkAuthorizer
# Every statement's permission check reads these caches; an entry is read again from system_auth once it is
# 10 s old (the default is 2 s: ~8 reloads a second under load, docs/performance.md "Cassandra per image").
# The price, for least privilege: a REVOKE (stack up's re-grants included), a dropped role or a changed password
# reaches sessions already logged in within 10 s.
permissions_validity: 10s
roles_validity: 10s
credentials_validity: 10s

# The native port speaks TLS only. The keystore is one unencrypted PEM (PKCS#8 key + chain, 0600) from the
# project CA (renewed by `stack up` before it expires; a restart of the node picks a renewed one up).
# Node-to-node encryption (server_encryption_options) is moot: one node, its storage port on loopback.
client_encryption_options:
  enabled: true
  optional: false
  ssl_context_factory:
    class_name: org.apache.cassandra.security.PEMBasedSslContextFactory
  keystore: {leaf.bundle}
  truststore: {Pki(s.tls_dir).ca_cert}
  require_client_auth: false
  accepted_protocols: [TLSv1.2, TLSv1.3]

data_file_directories:
  - {dirs["data_file_directories"]}
commitlog_directory: {dirs["commitlog_directory"]}
saved_caches_directory: {dirs["saved_caches_directory"]}
hints_directory: {dirs["hints_directory"]}
cdc_raw_directory: {dirs["cdc_raw_directory"]}
cdc_enabled: false
hinted_handoff_enabled: true
disk_failure_policy: stop
commit_failure_policy: stop

# Durability: every write goes to the commit log, synced every 10 s; a clean stop (SIGTERM)
# drains, i.e. flushes memtables to sstables, so a restart finds everything.
commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_segment_size: 32MiB
commitlog_total_space: 256MiB

# Sized for a shared 2-core dev box: small memtables and caches, few threads.
memtable_allocation_type: heap_buffers
memtable_heap_space: 64MiB
memtable_offheap_space: 64MiB
memtable_flush_writers: 1
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 8
concurrent_materialized_view_writes: 8
concurrent_compactors: 1
compaction_throughput: 32MiB/s
key_cache_size: 8MiB
row_cache_size: 0MiB
counter_cache_size: 1MiB
file_cache_size: 32MiB
networking_cache_size: 16MiB
prepared_statements_cache_size: 8MiB
index_summary_capacity: 8MiB
native_transport_max_threads: 32

# Tests create and drop keyspaces all day; snapshots of dropped tables would only fill the disk.
auto_snapshot: false
"""

    def render_logback(self) -> str:
        """INFO to the service log, rolled at 20 MiB; nothing to the console."""
        log = self.log_path
        return f"""\
<configuration scan="false" debug="false">
  <appender name="FILE" class="ch.qos.logback.core.rolling.RollingFileAppender">
    <file>{log}</file>
    <rollingPolicy class="ch.qos.logback.core.rolling.FixedWindowRollingPolicy">
      <fileNamePattern>{log}.%i</fileNamePattern>
      <minIndex>1</minIndex>
      <maxIndex>3</maxIndex>
    </rollingPolicy>
    <triggeringPolicy class="ch.qos.logback.core.rolling.SizeBasedTriggeringPolicy">
      <maxFileSize>20MB</maxFileSize>
    </triggeringPolicy>
    <encoder>
      <pattern>%d{{ISO8601}} %-5level [%thread] %logger{{1}}:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="FILE"/>
  </root>
</configuration>
"""

    # ---- run -------------------------------------------------------------------------
    def command(self) -> Sequence[str]:
        heap = self.settings.cassandra_heap
        jamm = sorted(self.lib_dir.glob("jamm-*.jar"))
        return [
            *_without_memory_locking(),
            java_binary(),
            f"-Xms{heap}", f"-Xmx{heap}", f"-Xmn{_young_generation_mib(heap)}m",
            *JVM_FOOTPRINT_FLAGS,
            *JVM17_MODULE_FLAGS,
            # jamm measures memtable sizes; without the agent it falls back to a slower guess.
            *([f"-javaagent:{jamm[-1]}"] if jamm else []),
            f"-Dcassandra.config={(self.conf / 'cassandra.yaml').as_uri()}",
            f"-Dlogback.configurationFile={(self.conf / 'logback.xml').as_uri()}",
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.storagedir={self.data}",
            f"-Dcassandra.logdir={self.settings.log_dir}",
            # JNA and netty unpack their native libraries here; keep them in the state dir.
            f"-Djava.io.tmpdir={self.tmp_dir}",
            f"-Dcassandra.triggers_dir={self.triggers_dir}",
            # Single node: no peers to wait for.
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            # No JMX listener (cassandra.jmx.local.port unset): nothing here uses nodetool.
            "-cp", f"{self.conf}:{self.lib_dir}/*",
            MAIN_CLASS,
        ]

    def probe(self) -> tuple[bool, str]:
        host, port = self.settings.host, self.settings.cassandra_port
        # The native port opens last in Cassandra's start-up; checking it first keeps the
        # driver from logging connection errors on every poll while the node boots.
        if not tcp_open(host, port, timeout_s=1.0):
            return False, f"CQL port {port} closed"

        try:
            admin = admin_credentials(self.settings)
        except SettingsError:
            admin = None  # before the first after_start: the node is healthy once it asks for a login
        try:
            return True, f"Cassandra {query_release_version(host, port, self.settings.tls_ca_file, admin)}"
        except LoginRequired as exc:
            return True, f"CQL over TLS, {exc}"
        except (StackError, SettingsError) as exc:
            return False, str(exc)

    def after_start(self, log: Callable[[str], None]) -> None:
        ensure_access(self.settings, time.monotonic() + self.settings.start_timeout_s, log)


def _young_generation_mib(heap: str) -> int:
    """Eden + survivors: a quarter of the heap, at most 128 MiB.

    Every eden page becomes resident after a few collections, so a small young
    generation keeps resident memory close to the live set; Cassandra's long-lived
    data (memtables, caches) belongs in the old generation anyway.
    """
    mib = int(heap[:-1]) * (1024 if heap.endswith("g") else 1)
    return max(16, min(128, mib // 4))


# Bit numbers from linux/capability.h.
_CAP_SETPCAP = 8
_CAP_IPC_LOCK = 14


def _without_memory_locking() -> list[str]:
    """A prefix that keeps Cassandra's start-up ``mlockall`` from pinning the whole JVM.

    Cassandra calls ``mlockall(MCL_CURRENT)`` unconditionally.  With CAP_IPC_LOCK (root)
    that succeeds and faults in the entire committed heap plus every mapped file (libjvm,
    the JDK module image): 1.1 GiB resident from the first second on a 768 MiB heap.
    Without the capability the call fails on RLIMIT_MEMLOCK, Cassandra logs a warning and
    memory becomes resident only as it is used (about 0.35 GiB after start).  Locking only
    guards against swapping, which a dev box should not be doing anyway.
    """
    effective = _effective_capabilities()
    if not effective >> _CAP_IPC_LOCK & 1 or not effective >> _CAP_SETPCAP & 1:
        return []  # nothing to drop (ordinary user), or not allowed to drop it
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    return [setpriv, "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--"]


def _effective_capabilities() -> int:
    # Read from /proc: psutil has no capability sets.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


class LoginRequired(StackError):
    """The node serves the native protocol over TLS and asks for a login that the probe cannot give."""


def query_release_version(host: str, port: int, ca_file: Path, credentials: Login | None,
                          timeout_s: float = 3.0) -> str:
    """``SELECT release_version FROM system.local`` over one bare driver connection (TLS verified against
    ``ca_file``, logged in with ``credentials``). LoginRequired when the node answers but has no login for us.

    A full ``Cluster`` would also fetch schema and token metadata and open a pool; a
    health probe needs a single round trip.
    """
    DefaultConnection.initialize_reactor()  # idempotent; a Cluster would do it for us
    authenticator = None if credentials is None else PlainTextAuthenticator(credentials.username,
                                                                            credentials.password)
    try:
        conn = DefaultConnection.factory(DefaultEndPoint(host, port), timeout_s, protocol_version=ProtocolVersion.V5,
                                         ssl_context=tls_context(ca_file), authenticator=authenticator)
    except AuthenticationFailed as exc:
        who = "no admin login yet" if credentials is None else f"login of {credentials.username} refused"
        raise LoginRequired(who) from exc
    except DRIVER_ERRORS as exc:
        raise StackError(f"CQL connect failed: {exc}") from exc
    try:
        msg = QueryMessage(query="SELECT release_version FROM system.local", consistency_level=ConsistencyLevel.ONE)
        result = conn.wait_for_response(msg, timeout=timeout_s)
    except DRIVER_ERRORS as exc:
        raise StackError(f"CQL query failed: {exc}") from exc
    finally:
        conn.close()
    if not isinstance(result, ResultMessage) or not result.parsed_rows:
        raise StackError(f"unexpected reply to the health query: {result!r}")
    return str(result.parsed_rows[0][0])
