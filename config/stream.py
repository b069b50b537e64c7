"""Settings of a stream-runtime process, and the librdkafka settings every Kafka client starts from."""

from __future__ import annotations

from typing import Any, Literal, Mapping

from config.base import ENV_PREFIX, Hosts, OptionalPath, Port, Settings, SettingsError, setting
from config.credentials import Login
from config.stack import StackSettings


class StreamSettings(Settings):
    """Settings of a stream-runtime process (a pipeline stage, the bridge)."""

    bootstrap: str = setting("127.0.0.1:9092", doc="Kafka bootstrap servers; default <host>:<kafka_port>",
                             env="KAFKA_BOOTSTRAP", min_length=1)
    # HTTPS, verified against tls_ca_file (the project CA).
    registry_url: str = setting("https://127.0.0.1:8081/apis/ccompat/v7",
                                doc="Schema registry (Confluent-compatible API) URL", min_length=1)
    # Kafka: SASL_SSL with SCRAM-SHA-512 as this principal (a pipeline role, `admin` for operator tools);
    # its password is read on use from <kafka_users_dir>/<kafka_user>.json, never part of repr.
    kafka_user: str = setting("admin", doc="Kafka SCRAM principal this process connects as", min_length=1)
    kafka_users_dir: OptionalPath = setting(None, doc="Directory of Kafka principals' credentials files; "
                                                      "default <home>/secrets/kafka")
    tls_ca_file: OptionalPath = setting(None, doc="CA certificate clients verify the services with; "
                                                  "default <home>/secrets/tls/ca.crt")
    cassandra_hosts: Hosts = setting(("127.0.0.1",), doc="Cassandra contact points, comma-separated")
    cassandra_port: Port = setting(9042, doc="Cassandra native protocol port")
    keyspace: str = setting("detectflow", doc="Cassandra keyspace", env="CASSANDRA_KEYSPACE", min_length=1)
    # Cassandra accepts only authenticated TLS clients: each process logs in as its role with the credentials in
    # <cassandra_secrets_dir>/<role>.json (made by `stack up`, read on use, never in repr) and verifies the
    # node's certificate against cassandra_ca_file. None: not configured (connect refuses, naming the variable).
    cassandra_secrets_dir: OptionalPath = setting(None, doc="Directory of Cassandra roles' credentials files; "
                                                            "default <home>/secrets/cassandra")
    cassandra_ca_file: OptionalPath = setting(None, doc="CA certificate Cassandra's is verified with; "
                                                        "default <home>/secrets/tls/ca.crt")
    # A batch leaves the poll when it has max_batch records or max_wait_ms passed.
    max_batch: int = setting(64, doc="Records per polled batch, at most", ge=1)
    max_wait_ms: int = setting(50, doc="How long a poll waits to fill a batch (ms)", ge=0)
    # Transient failures: in-loop backoff attempts, then the retry topic, then the DLQ. The retry topic is
    # budgeted by time, not attempts: a record is retried (delays from retry_delay_ms doubling up to
    # retry_delay_max_ms) until retry_budget_ms after its first failure, so a dependency down for up to
    # 10 minutes delays its records instead of failing them.
    backoff_attempts: int = setting(3, doc="In-loop retries of a transient failure before the retry topic", ge=0)
    backoff_initial_ms: int = setting(200, doc="First in-loop backoff delay (ms)", ge=0)
    backoff_max_ms: int = setting(2000, doc="Largest in-loop backoff delay (ms)", ge=0)
    retry_delay_ms: int = setting(2000, doc="First delay of the retry topic (ms)", ge=0)
    retry_delay_max_ms: int = setting(30000, doc="Largest delay of the retry topic (ms)", ge=0)
    retry_budget_ms: int = setting(900000, doc="How long after its first failure a record is retried (ms)", ge=0)
    # A record whose processing killed its process this many times (the same offset, seen again after each
    # restart) is set aside to the DLQ without being processed again. Tracked in <state_dir>/poison.
    poison_max_crashes: int = setting(3, doc="Crashes on one record before it goes to the DLQ unprocessed", ge=1)
    state_dir: OptionalPath = setting(None, doc="Per-process state (poison records); default <home>/run")
    flush_timeout_s: float = setting(30.0, doc="How long a producer flush may take (s)", gt=0)
    # How often the online backlog is measured to pause/resume batch partitions.
    lane_check_interval_ms: int = setting(100, doc="How often the online backlog is measured (ms)", ge=1)
    # Online first, but the batch lane is never starved: under a steady online load nearly every batch holds an
    # online record, and strict priority kept batch partitions paused for minutes (the soak's ingest records).
    # Paused this long, the batch lane gets a turn of batch_turn_ms, read alongside the online lane.
    batch_max_wait_ms: int = setting(5000, doc="Longest the batch lane stays paused behind an online backlog before "
                                               "it gets a turn (ms; 0: strict online priority)", ge=0)
    batch_turn_ms: int = setting(1000, doc="How long the batch lane's turn lasts (ms)", ge=1)
    # Checkpoints: a stage commits its offsets (and its open exactly-once transaction) when it has caught up,
    # or at the latest this long after the last commit while it has a backlog (one commit for many batches).
    commit_interval_ms: int = setting(250, doc="Longest time between commits while behind (ms)", ge=0)
    metrics_port: int = setting(0, doc="Prometheus metrics port (0: none)", ge=0, le=65535)
    # glibc keeps freed memory for reuse, so a stage's RSS stays at its worst peak; between batches the runtime
    # gives free heap pages back at most this often (stream/heap.py).
    heap_trim_interval_s: float = setting(30.0, doc="How often a stage returns freed heap memory to the OS "
                                                    "(s; 0: never)", ge=0)
    # A loop that stops turning (a call that never returns) ends its process, to be restarted (stream/watchdog.py).
    # 300 s is librdkafka's max.poll.interval.ms: past it the consumer has left its group anyway. The same watchdog
    # holds each commit and transaction call to flush_timeout_s + 10 s (runtime.CALL_GRACE_S); 0 turns both off.
    loop_stall_s: float = setting(300.0, doc="Longest a stage loop may go without turning before its process "
                                             "exits to be restarted (s; 0: never)", ge=0)
    max_message_bytes: int = setting(16 * 1024 * 1024, doc="Largest record produced or fetched (bytes)", ge=1)
    # The bound of a stage consumer's local queue of pre-fetched records (librdkafka's
    # queued.max.messages.kbytes; its default, 64 MiB, can hold ~120 tensors in inference's memory). A
    # record larger than the bound is still fetched, one at a time.
    prefetch_kbytes: int = setting(8192, doc="Bound of a consumer's pre-fetched records (KiB)", ge=1)
    # Producer compression (lz4 shrinks the letterboxed tensors' padding; JPEG/PNG bytes do not
    # shrink). Measured with `detectflow bench pipeline`: no CPU difference against "none" here.
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = setting("lz4", doc="Producer compression")
    # Topics that hold image bytes or tensors (the lanes, their retry and DLQ topics) keep records at most
    # this long (`detectflow topics apply` sets retention.ms). Must exceed the longest backlog a lane may hold.
    raw_retention_hours: float = setting(6.0, doc="Retention of topics holding image bytes or tensors (h)", gt=0)
    topic_prefix: str = setting("", doc="Prefix of every topic name (tests, side-by-side deployments)")
    # Stable per deployment slot (e.g. a pod name): the transactional id of exactly-once stages
    # derives from it, so a restarted instance fences its predecessor. Empty: random per process.
    instance_id: str = setting("", doc="Stable id of this deployment slot (transactional ids); empty: random")

    def _env_defaults(self, env: Mapping[str, str]) -> dict[str, Any]:
        stack = StackSettings.from_env(env)
        return {"bootstrap": stack.kafka_bootstrap, "registry_url": stack.registry_url,
                "kafka_users_dir": stack.kafka_users_dir, "tls_ca_file": stack.tls_ca_file,
                "cassandra_hosts": (stack.host,), "cassandra_port": stack.cassandra_port,
                "cassandra_secrets_dir": stack.cassandra_roles_dir, "cassandra_ca_file": stack.tls_ca_file,
                "state_dir": stack.run_dir}

    def cassandra_credentials(self, role: str) -> Login:
        """The login of one Cassandra role (its grants cover only the tables that role uses)."""
        if self.cassandra_secrets_dir is None:
            raise SettingsError(f"no Cassandra credentials directory configured ({ENV_PREFIX}CASSANDRA_SECRETS_DIR)")
        if not role.replace("-", "").isalnum():
            raise SettingsError(f"invalid Cassandra role {role!r}")
        return Login.load(self.cassandra_secrets_dir / f"{role}.json")

