"""ClamAV clamd from Debian, with the project's own signature database.

freshclam cannot reach its mirror from these machines, so clamd loads only
``infra/clamav/*.ndb``: EICAR plus project test markers.  A production
deployment mounts the official databases instead (see docker-compose.yml).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Mapping, Sequence

from infra.stack.base import Service, StackError, run_logged

SIGNATURE_DIR = Path(__file__).resolve().parent.parent / "clamav"


def clamd_binary() -> str | None:
    return shutil.which("clamd") or (os.path.exists("/usr/sbin/clamd") and "/usr/sbin/clamd") or None


# What clamd does to each stream beyond matching the signature set against its bytes. ClamAV's defaults
# decode every image to compute its fuzzy hash (ScanImageFuzzyHash, under ScanImage): ~60% of clamd's CPU
# per unique JPEG, for signatures (ldb fuzzy_img#) that the project's set does not use; ndb/hdb signatures
# match the raw bytes whatever these say. ScanImage also gates the image parsers' heuristics, which alert
# only with AlertBrokenMedia (off). The other engines cost nothing measurable on an image and stay on.
# Measured by `detectflow bench clamd`; figures and what is given up: docs/performance.md, "clamd per image".
SCAN_OPTIONS: dict[str, str] = {
    "Bytecode": "no",
    "ScanImage": "no",
    "ScanImageFuzzyHash": "no",
}


def render_conf(*, port: int, host: str, db_dir: Path, tmp_dir: Path, log_path: Path, pid_file: Path,
                stream_max_bytes: int, options: Mapping[str, str] = SCAN_OPTIONS) -> str:
    """clamd.conf for one daemon; ``options`` are the scan settings (the bench tries others)."""
    mib = stream_max_bytes // (1024 * 1024)
    # clamd drops the connection when a stream passes StreamMaxLength; the scan
    # stage caps streams below this on the client side so it gets a verdict instead.
    lines = [
        "Foreground yes",
        f"LogFile {log_path}",
        "LogTime yes",
        "LogVerbose no",
        f"PidFile {pid_file}",
        f"DatabaseDirectory {db_dir}",
        f"TemporaryDirectory {tmp_dir}",
        f"TCPSocket {port}",
        f"TCPAddr {host}",
        "MaxConnectionQueueLength 30",
        "MaxThreads 4",
        "ReadTimeout 30",
        "CommandReadTimeout 10",
        f"StreamMaxLength {mib}M",
        f"MaxFileSize {mib}M",
        f"MaxScanSize {mib * 2}M",
        "SelfCheck 600",
        *(f"{name} {value}" for name, value in options.items()),
    ]
    return "\n".join(lines) + "\n"


class ClamdService(Service):
    name = "clamd"
    stop_timeout_s = 20.0

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.settings.clamd_port}"

    @property
    def db_dir(self) -> Path:
        return self.data / "db"

    def installed(self) -> bool:
        return clamd_binary() is not None

    def install(self, log: Callable[[str], None]) -> None:
        if os.geteuid() != 0:
            raise StackError("clamd is missing: run `sudo apt-get install -y clamav-daemon` (Debian) and retry")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run_logged(["apt-get", "update", "-q"], log, env=env, timeout_s=600)
        run_logged(["apt-get", "install", "-y", "-q", "--no-install-recommends", "clamav-daemon"], log,
                   env=env, timeout_s=900)

    def prepare(self, log: Callable[[str], None]) -> None:
        self.db_dir.mkdir(parents=True, exist_ok=True)
        wanted = {p.name for p in SIGNATURE_DIR.glob("*.ndb")}
        for stale in self.db_dir.glob("*.ndb"):
            if stale.name not in wanted:
                stale.unlink()
        for sig in SIGNATURE_DIR.glob("*.ndb"):
            shutil.copyfile(sig, self.db_dir / sig.name)
        self.conf.mkdir(parents=True, exist_ok=True)
        cfg = render_conf(port=self.settings.clamd_port, host=self.settings.host, db_dir=self.db_dir,
                          tmp_dir=self.data / "tmp", log_path=self.log_path,
                          pid_file=self.settings.run_dir / "clamd.own.pid",
                          stream_max_bytes=self.settings.clamd_stream_max_bytes)
        (self.data / "tmp").mkdir(parents=True, exist_ok=True)
        (self.conf / "clamd.conf").write_text(cfg)

    def command(self) -> Sequence[str]:
        binary = clamd_binary()
        if binary is None:
            raise StackError("clamd binary not found")
        return [binary, f"--config-file={self.conf / 'clamd.conf'}"]

    def probe(self) -> tuple[bool, str]:
        try:
            with socket.create_connection((self.settings.host, self.settings.clamd_port), timeout=1.0) as sock:
                sock.settimeout(2.0)
                sock.sendall(b"zPING\0")
                reply = sock.recv(64)
        except OSError as exc:
            return False, str(exc)
        return reply.rstrip(b"\0\n") == b"PONG", reply.decode(errors="replace").strip("\0\n")
