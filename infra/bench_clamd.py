"""`detectflow bench clamd`: clamd's CPU per unique image under candidate scan settings, and what each detects.

Every candidate is a set of scan options over the stack's own clamd.conf (``render_conf`` in
infra/stack/clamd.py: same limits, threads, timeouts). Each runs in its own throwaway clamd (the stack's
binary, a temporary directory, a free port; the shared stack's clamd is never touched) loaded with the
project's signatures (infra/clamav/*.ndb) plus one fuzzy-image signature the bench makes for a sample, so
the detection table shows what ScanImageFuzzyHash buys. Then, in rounds that alternate between the
candidates (this host's speed drifts):

1. ``--images`` scans per candidate, every body unique (the samples as JPEGs, JPEGs as they are and the
   others re-encoded, each with its own COM segment): clamd's own cache of clean verdicts, keyed by the
   bytes, never answers; the pipeline's images are unique too.
2. clamd CPU-ms per image (utime + stime of the daemon, through psutil) and the client's ms per scan,
   with a new TCP connection per scan as processors/scanner.py does; for the shipped options also over
   one IDSESSION connection.
3. Detection: every ndb signature's bytes alone, in the middle of a JPEG, in a JPEG comment and after a
   PNG; the fuzzy-image signature against the same pixels with other bytes; a clean JPEG.

Exit status 1 when the shipped options miss something the project's signatures target.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from config import StackSettings
from infra.bench_bodies import BenchError, reencode_jpeg, with_comment
from infra.procstats import cpu_seconds
from infra.stack.clamd import SCAN_OPTIONS, SIGNATURE_DIR, clamd_binary, render_conf
from model_store.tools.samples import ensure_samples
from processors.scanner import ClamdScanner, ScanVerdict, send_stream

# The options before issue 14: ClamAV's defaults but for the bytecode engine.
BEFORE: dict[str, str] = {"Bytecode": "no"}
_PARSERS_OFF = {k: "no" for k in ("ScanPE", "ScanELF", "ScanOLE2", "ScanPDF", "ScanSWF", "ScanHTML", "ScanMail",
                                  "ScanArchive", "ScanXMLDOCS", "ScanHWP3", "ScanOneNote")}
CANDIDATES: tuple[tuple[str, Mapping[str, str]], ...] = (
    ("before (ClamAV defaults, Bytecode no)", BEFORE),
    ("+ ScanImageFuzzyHash no", {**BEFORE, "ScanImageFuzzyHash": "no"}),
    ("+ ScanImage no", {**BEFORE, "ScanImage": "no"}),
    ("+ ScanImage no, ScanImageFuzzyHash no", {**BEFORE, "ScanImage": "no", "ScanImageFuzzyHash": "no"}),
    ("+ HeuristicAlerts no", {**BEFORE, "HeuristicAlerts": "no"}),
    ("+ PhishingSignatures/ScanURLs no", {**BEFORE, "PhishingSignatures": "no", "PhishingScanURLs": "no"}),
    ("+ every other parser no (PE ELF OLE2 PDF SWF HTML Mail Archive...)", {**BEFORE, **_PARSERS_OFF}),
    ("+ DisableCache yes", {**BEFORE, "DisableCache": "yes"}),
    ("shipped (SCAN_OPTIONS)", SCAN_OPTIONS),
    ("shipped, TemporaryDirectory on tmpfs (/dev/shm)", SCAN_OPTIONS),
)
SHIPPED = len(CANDIDATES) - 2
# clamd spools every INSTREAM to a file in TemporaryDirectory; the bench makes its own mkdtemp (0700) there.
TMPFS = Path("/dev/shm")  # noqa: S108
FUZZY_NAME = "Detectflow.Bench.FuzzyImage"
START_DEADLINE_S = 60.0


@dataclass(frozen=True)
class Signature:
    name: str
    body: bytes


def ndb_signatures(text: str) -> list[Signature]:
    """The ndb lines whose pattern is plain hex (no wildcards), as the bytes they match."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) >= 4 and not line.startswith("#") and re.fullmatch(r"(?:[0-9a-fA-F]{2})+", parts[3]):
            out.append(Signature(parts[0], bytes.fromhex(parts[3])))
    return out


def detection_cases(signatures: Sequence[Signature], jpeg: bytes, png: bytes) -> list[tuple[str, bytes, str | None]]:
    """(case, body, the signature clamd must name, or None for clean)."""
    half = len(jpeg) // 2
    cases: list[tuple[str, bytes, str | None]] = [("clean JPEG", jpeg, None)]
    for sig in signatures:
        cases += [
            (f"{sig.name} alone", sig.body, sig.name),
            (f"{sig.name} mid-JPEG", jpeg[:half] + sig.body + jpeg[half:], sig.name),
            (f"{sig.name} in a JPEG comment", with_comment(jpeg, sig.body), sig.name),
            (f"{sig.name} after a PNG", png + sig.body, sig.name),
        ]
    return cases


class SessionClient:
    """INSTREAM scans over one IDSESSION connection (clamd answers '<n>: stream: OK')."""

    def __init__(self, host: str, port: int, timeout_s: float):
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.sendall(b"zIDSESSION\0")

    def scan(self, data: bytes) -> ScanVerdict:
        self.sock.sendall(b"zINSTREAM\0")
        send_stream(self.sock, data)
        reply = b""
        while not reply.endswith(b"\0"):
            part = self.sock.recv(4096)
            if not part:
                raise BenchError("clamd closed the session")
            reply += part
        answer = reply.rstrip(b"\0").decode().split(": ", 1)[1]  # "<n>: stream: OK"
        if answer == "stream: OK":
            return ScanVerdict(True)
        if answer.endswith(" FOUND"):
            return ScanVerdict(False, answer.removeprefix("stream: ").removesuffix(" FOUND"))
        raise BenchError(f"clamd gave no verdict: {answer}")

    def close(self) -> None:
        try:
            self.sock.sendall(b"zEND\0")
        finally:
            self.sock.close()


@dataclass
class Tally:
    """Totals over the measured scans of one candidate (or one client)."""

    clamd_cpu_s: float = 0.0
    client_s: float = 0.0
    client_cpu_s: float = 0.0
    scans: int = 0

    def per_scan_ms(self) -> tuple[float, float, float]:
        n = max(self.scans, 1)
        return self.clamd_cpu_s * 1000 / n, self.client_s * 1000 / n, self.client_cpu_s * 1000 / n


@dataclass
class Daemon:
    label: str
    options: Mapping[str, str]
    port: int
    proc: subprocess.Popen[bytes]
    stderr: Path
    tmp_dir: Path
    tally: Tally = field(default_factory=Tally)

    def scanner(self) -> ClamdScanner:
        return ClamdScanner("127.0.0.1", self.port, timeout_s=30.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(binary: str, work: Path, db_dir: Path, label: str, options: Mapping[str, str], max_bytes: int,
           spool: Path | None = None) -> Daemon:
    own = Path(tempfile.mkdtemp(dir=work))
    tmp_dir = Path(tempfile.mkdtemp(dir=spool or own, prefix="bench-clamd-"))
    port = _free_port()
    conf = own / "clamd.conf"
    conf.write_text(render_conf(port=port, host="127.0.0.1", db_dir=db_dir, tmp_dir=tmp_dir,
                                log_path=own / "clamd.log", pid_file=own / "clamd.pid",
                                stream_max_bytes=max_bytes, options=options))
    stderr = own / "stderr.log"
    with open(stderr, "wb") as err:  # the child keeps its own descriptor
        proc = subprocess.Popen([binary, f"--config-file={conf}"], stdout=subprocess.DEVNULL, stderr=err)
    return Daemon(label, options, port, proc, stderr, tmp_dir)


def _wait_ready(daemons: Sequence[Daemon]) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    for d in daemons:
        while True:
            if d.proc.poll() is not None:
                raise BenchError(f"clamd ({d.label}) exited with {d.proc.returncode}: {d.stderr.read_text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", d.port), timeout=1.0) as s:
                    s.settimeout(2.0)
                    s.sendall(b"zPING\0")
                    if s.recv(16).startswith(b"PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"clamd ({d.label}) did not answer PING within {START_DEADLINE_S:.0f}s")
            time.sleep(0.2)


def _stop(daemons: Sequence[Daemon]) -> None:
    for d in daemons:
        if d.proc.poll() is None:
            d.proc.terminate()
    for d in daemons:
        try:
            d.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait(timeout=5)
        shutil.rmtree(d.tmp_dir, ignore_errors=True)  # on tmpfs it is outside the bench's directory


def mirrored_jpeg(jpeg: bytes) -> bytes:
    """The image flipped left-right, as a JPEG: the same content, other pixels, another fuzzy hash."""
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    ok, buf = cv2.imencode(".jpg", cv2.flip(img, 1), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if img is None or not ok:
        raise BenchError("could not mirror a sample")
    return buf.tobytes()


def fuzzy_image_hash(binary: str, work: Path, db_dir: Path, jpeg: bytes, max_bytes: int) -> str | None:
    """The image fuzzy hash clamd computes for ``jpeg`` (from its debug output), or None when it logs none."""
    d = _start(binary, work, db_dir, "debug", {**BEFORE, "Debug": "yes"}, max_bytes)
    try:
        _wait_ready([d])
        d.scanner().scan(jpeg)
    finally:
        _stop([d])
    m = re.search(rb"Image hash: ([0-9a-f]{16})", d.stderr.read_bytes())
    return m.group(1).decode() if m else None


def _verdict_name(v: ScanVerdict) -> str | None:
    return None if v.clean else v.signature


def run_bench_clamd(stack: StackSettings, *, images: int) -> int:
    binary = clamd_binary()
    if binary is None:
        raise BenchError("clamd is not installed (`detectflow stack up` installs it)")
    paths = ensure_samples(stack.samples_dir, stack.cache_dir)
    raw = [p.read_bytes() for p in paths]
    bases = [d if d.startswith(b"\xff\xd8") else reencode_jpeg(d) for d in raw]
    png = next((d for d in raw if d.startswith(b"\x89PNG")), reencode_jpeg(raw[0]))
    signatures = [s for f in sorted(SIGNATURE_DIR.glob("*.ndb")) for s in ndb_signatures(f.read_text())]
    max_bytes = stack.clamd_stream_max_bytes
    rounds = max(1, images // len(bases))
    tag = os.urandom(4).hex()

    with tempfile.TemporaryDirectory(prefix="bench-clamd-") as tmp:
        work = Path(tmp)
        db_dir = work / "db"
        db_dir.mkdir()
        for f in SIGNATURE_DIR.glob("*.ndb"):
            (db_dir / f.name).write_bytes(f.read_bytes())
        probe = mirrored_jpeg(bases[0])  # pixels of its own, so the fuzzy signature matches no measured body
        fuzzy = fuzzy_image_hash(binary, work, db_dir, probe, max_bytes)
        if fuzzy:
            (db_dir / "bench-fuzzy.ldb").write_text(f"{FUZZY_NAME};Engine:150-255,Target:0;0;fuzzy_img#{fuzzy}\n")
        daemons = [_start(binary, work, db_dir, label, opts, max_bytes,
                          TMPFS if "tmpfs" in label and TMPFS.is_dir() else None) for label, opts in CANDIDATES]
        in_session = Tally()  # the shipped candidate again, over one IDSESSION connection
        try:
            _wait_ready(daemons)
            for d in daemons:  # warm-up: threads spawned, pages touched
                for i, b in enumerate(bases):
                    d.scanner().scan(with_comment(b, f"warm {tag} {d.port} {i}".encode()))
            session = SessionClient("127.0.0.1", daemons[SHIPPED].port, 30.0)
            try:
                for r in range(rounds):
                    for d in daemons:
                        _measure(d, d.scanner().scan, bases, f"{tag} r{r} {d.port}", d.tally)
                    _measure(daemons[SHIPPED], session.scan, bases, f"{tag} s{r}", in_session)
            finally:
                session.close()
            detection = {d.label: _detect(d, signatures, bases[0], png, probe, fuzzy) for d in daemons}
        finally:
            _stop(daemons)

    _report(daemons, in_session, detection, len(bases), rounds, fuzzy)
    missed = [case for case, (want, got) in detection[CANDIDATES[SHIPPED][0]].items()
              if want != got and want != FUZZY_NAME]
    return 1 if missed else 0


def _measure(d: Daemon, scan: Callable[[bytes], ScanVerdict], bases: Sequence[bytes], tag: str,
             tally: Tally) -> None:
    bodies = [with_comment(b, f"detectflow-bench clamd {tag} {i}".encode()) for i, b in enumerate(bases)]
    cpu0, c0, t0 = cpu_seconds(d.proc.pid), time.process_time(), time.perf_counter()
    for body in bodies:
        v = scan(body)
        if not v.clean:
            raise BenchError(f"clamd ({d.label}) flagged a clean sample: {v.signature}")
    tally.client_s += time.perf_counter() - t0
    tally.client_cpu_s += time.process_time() - c0
    tally.clamd_cpu_s += cpu_seconds(d.proc.pid) - cpu0
    tally.scans += len(bodies)


def _detect(d: Daemon, signatures: Sequence[Signature], jpeg: bytes, png: bytes, probe: bytes,
            fuzzy: str | None) -> dict[str, tuple[str | None, str | None]]:
    """case -> (wanted signature, what clamd named)."""
    scanner = d.scanner()
    out = {case: (want, _verdict_name(scanner.scan(body)))
           for case, body, want in detection_cases(signatures, jpeg, png)}
    if fuzzy:
        # Same pixels, other bytes: only the image fuzzy hash can tell.
        out["fuzzy_img signature, same pixels + a comment"] = (
            FUZZY_NAME, _verdict_name(scanner.scan(with_comment(probe, b"other bytes, same pixels"))))
    return out


def _report(daemons: Sequence[Daemon], in_session: Tally,
            detection: Mapping[str, Mapping[str, tuple[str | None, str | None]]], n_bases: int, rounds: int,
            fuzzy: str | None) -> None:
    print(f"detectflow bench clamd: {clamd_version()}; {n_bases} sample JPEGs x {rounds} rounds = "
          f"{n_bases * rounds} unique bodies per candidate, rounds alternating between candidates")
    before = daemons[0].tally.per_scan_ms()[0]
    print(f"\n{'candidate (a new TCP connection per scan unless said)':68s} {'clamd CPU-ms/img':>16s} "
          f"{'vs before':>9s} {'client ms/scan':>14s} {'client CPU-ms':>13s}")
    rows = [(d.label, d.tally) for d in daemons] + [("shipped, one IDSESSION connection for every scan", in_session)]
    for label, tally in rows:
        cpu, wall, client_cpu = tally.per_scan_ms()
        ratio = cpu / before if before else float("nan")
        print(f"{label:68s} {cpu:16.2f} {ratio:8.2f}x {wall:14.2f} {client_cpu:13.2f}")
    print(f"\ndetection, what differs from the wanted verdict ('-': nothing; the fuzzy-image signature: "
          f"{'hash ' + fuzzy if fuzzy else 'none, clamd logged no hash'}):")
    cases = list(next(iter(detection.values())))
    for label, results in detection.items():
        wrong = [f"{case}: {'MISSED' if got is None else got}" for case in cases
                 for want, got in [results[case]] if want != got]
        print(f"  {label:68s} {'; '.join(wrong) if wrong else '-'}")
    print(f"  ({len(cases)} cases: " + ", ".join(cases) + ")")


def clamd_version() -> str:
    binary = clamd_binary()
    if binary is None:
        return "clamd ?"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.strip() or "clamd ?"
