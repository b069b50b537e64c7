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
from typing import Callable, Sequence

from infra.stack.base import Service, StackError, run_logged

SIGNATURE_DIR = Path(__file__).resolve().parent.parent / "clamav"


def clamd_binary() -> str | None:
    return shutil.which("clamd") or (os.path.exists("/usr/sbin/clamd") and "/usr/sbin/clamd") or None


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
        # clamd drops the connection when a stream passes StreamMaxLength; the scan
        # stage caps streams below this on the client side so it gets a verdict instead.
        cfg = f"""\
Foreground yes
LogFile {self.log_path}
LogTime yes
LogVerbose no
PidFile {self.settings.run_dir / 'clamd.own.pid'}
DatabaseDirectory {self.db_dir}
TemporaryDirectory {self.data / 'tmp'}
TCPSocket {self.settings.clamd_port}
TCPAddr {self.settings.host}
MaxConnectionQueueLength 30
MaxThreads 4
ReadTimeout 30
CommandReadTimeout 10
StreamMaxLength {self.settings.clamd_stream_max_bytes // (1024 * 1024)}M
MaxFileSize {self.settings.clamd_stream_max_bytes // (1024 * 1024)}M
MaxScanSize {self.settings.clamd_stream_max_bytes // (1024 * 1024) * 2}M
SelfCheck 600
Bytecode no
"""
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
