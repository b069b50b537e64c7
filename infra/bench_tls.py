"""`detectflow bench tls`: what TLS + SCRAM cost one stage-to-stage hop, against plaintext, in one run.

The stack's broker takes SASL_SSL only, so the baseline runs on a throwaway broker (the stack's Kafka jars,
a temporary directory, free ports) with two client listeners: PLAINTEXT and SASL_SSL (SCRAM-SHA-512, a
certificate of a temporary CA). Rounds alternate between the two, each a hop as the runtime loop makes it
(produce + flush with acks=all, poll from a group, sync commit), with random bytes. Printed per listener and
record size: median latency, client CPU-ms and broker CPU-ms per hop, and the SASL_SSL/PLAINTEXT ratio.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    NewTopic,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from config import StackSettings
from infra.procstats import cpu_seconds
from infra.stack.base import java_binary
from infra.stack.kafka import new_cluster_id
from infra.stack.pki import Pki, issue
from stream.kafka import kafka_admin, kafka_consumer, kafka_producer, plaintext_connection, scram_connection

SIZES = (1_000, 512 * 1024)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cpu_ms(pid: int) -> float:
    return cpu_seconds(pid) * 1000


def _start_broker(settings: StackSettings, work: Path) -> tuple[subprocess.Popen[bytes], dict[str, dict[str, Any]]]:
    pki = Pki(work / "tls")
    leaf = issue(pki, "kafka")
    plain, secure, controller = _free_ports(3)
    props = work / "server.properties"
    props.write_text(f"""process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller}
listeners=PLAIN://127.0.0.1:{plain},SECURE://127.0.0.1:{secure},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAIN://127.0.0.1:{plain},SECURE://127.0.0.1:{secure}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAIN
listener.security.protocol.map=PLAIN:PLAINTEXT,SECURE:SASL_SSL,CONTROLLER:PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.secure.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location={leaf.bundle}
log.dirs={work / "logs"}
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
group.coordinator.append.linger.ms=0
message.max.bytes=2097152
""")
    lib = settings.opt_dir / "kafka" / "lib"
    java = java_binary()
    subprocess.run([java, "-Xmx256m", "-cp", f"{lib}/*", "kafka.tools.StorageTool", "format", "-t", new_cluster_id(),
                    "-c", str(props)], check=True, capture_output=True, timeout=120)
    log = open(work / "kafka.log", "wb")  # the broker's output; closed when the process ends
    proc = subprocess.Popen([java, "-Xms384m", "-Xmx384m", "-cp", f"{lib}/*", "kafka.Kafka", str(props)],
                            stdout=log, stderr=subprocess.STDOUT)
    password = uuid.uuid4().hex
    conf = {"plaintext": plaintext_connection(f"127.0.0.1:{plain}"),
            "sasl_ssl": scram_connection(f"127.0.0.1:{secure}", "bench", password, pki.ca_cert)}
    _await_and_add_user(conf["plaintext"], password, proc)
    return proc, conf


def _await_and_add_user(plain: dict[str, Any], password: str, proc: subprocess.Popen[bytes]) -> None:
    admin = kafka_admin(plain, log_level=0)
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the throwaway broker exited; see its kafka.log")
        try:
            if admin.list_topics(timeout=2).brokers:
                break
        except KafkaException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the throwaway broker did not start within 90 s")
    upsert = UserScramCredentialUpsertion("bench", ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
                                          password.encode(), os.urandom(16))
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result(timeout=30)


def _hops(admin: Any, conf: dict[str, Any], size: int, rounds: int, broker_pid: int) -> dict[str, float]:
    topic = f"bench-tls-{uuid.uuid4().hex[:8]}"  # a new topic per pass: every record it gets is this pass's
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    producer = kafka_producer(conf, linger_ms=0, extra={"message.max.bytes": 2 * 1024 * 1024})
    consumer = kafka_consumer(conf, topic, offset_reset="earliest", extra={"fetch.wait.max.ms": 10})
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(0.1)
    laps = []
    client0, broker0 = time.process_time(), _cpu_ms(broker_pid)
    for _ in range(rounds):
        t0 = time.perf_counter()
        producer.produce(topic, os.urandom(size))
        if producer.flush(30):
            raise RuntimeError("produce not acknowledged within 30 s")
        msg = None
        while msg is None or msg.error() is not None:
            msg = consumer.poll(1.0)
            if time.perf_counter() - t0 > 30:
                raise RuntimeError("record not consumed within 30 s")
        consumer.commit(message=msg, asynchronous=False)
        laps.append((time.perf_counter() - t0) * 1000)
    client_ms = (time.process_time() - client0) * 1000 / rounds
    broker_ms = (_cpu_ms(broker_pid) - broker0) / rounds
    consumer.close()
    return {"ms": statistics.median(laps), "client_cpu_ms": client_ms, "broker_cpu_ms": broker_ms}


def run_bench_tls(settings: StackSettings, *, rounds: int = 200, passes: int = 3) -> int:
    work = Path(tempfile.mkdtemp(prefix="detectflow-bench-tls-"))
    proc, conf = _start_broker(settings, work)
    try:
        admin = kafka_admin(conf["plaintext"])
        print(f"detectflow bench tls: {rounds} hops per pass, {passes} passes alternating, a throwaway broker "
              f"(pid {proc.pid}); medians over passes")
        print(f"{'record':>10} {'listener':>9} {'hop ms':>8} {'client CPU-ms':>14} {'broker CPU-ms':>14}")
        for size in SIZES:
            results: dict[str, list[dict[str, float]]] = {"plaintext": [], "sasl_ssl": []}
            for _ in range(passes):
                for name in results:
                    results[name].append(_hops(admin, conf[name], size, rounds, proc.pid))
            med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
            for name, m in med.items():
                print(f"{size:>8} B {name:>9} {m['ms']:>8.2f} {m['client_cpu_ms']:>14.3f} {m['broker_cpu_ms']:>14.3f}")
            extra = {k: med["sasl_ssl"][k] - med["plaintext"][k] for k in med["plaintext"]}
            ratio = med["sasl_ssl"]["ms"] / med["plaintext"]["ms"]
            print(f"{size:>8} B {'+TLS+SASL':>9} {extra['ms']:>+8.2f} {extra['client_cpu_ms']:>+14.3f} "
                  f"{extra['broker_cpu_ms']:>+14.3f}  (hop {ratio:.2f}x plaintext)")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0
