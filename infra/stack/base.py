"""The contract every local-stack service implements, and the shared start/stop logic."""

from __future__ import annotations

import abc
import functools
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from config import StackSettings
from infra.stack import process


class StackError(RuntimeError):
    """A service could not be installed, started or stopped."""


class ServiceStartError(StackError):
    def __init__(self, name: str, reason: str, log_path: Path):
        self.service = name
        self.log_path = log_path
        super().__init__(
            f"{name} failed to start: {reason}\n  log: {log_path}\n"
            f"  last lines:\n{_indent(process.tail(log_path, 20))}"
        )


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


@dataclass(frozen=True)
class Health:
    name: str
    address: str
    running: bool
    healthy: bool
    pid: int | None
    rss_bytes: int
    detail: str = ""


class Service(abc.ABC):
    """One service of the local stack.

    Subclasses say how to install (idempotently, into the cache), what to run
    and how to probe health; this base runs, supervises and stops the process.
    """

    name: str
    depends_on: tuple[str, ...] = ()
    stop_timeout_s: float = 60.0

    def __init__(self, settings: StackSettings):
        self.settings = settings

    # ---- paths -----------------------------------------------------------------
    @property
    def opt(self) -> Path:
        return self.settings.opt_dir / self.name

    @property
    def data(self) -> Path:
        return self.settings.data_dir / self.name

    @property
    def conf(self) -> Path:
        return self.settings.conf_dir / self.name

    @property
    def log_path(self) -> Path:
        return self.settings.log_dir / f"{self.name}.log"

    @property
    def pidfile(self) -> process.PidFile:
        return process.PidFile(self.settings.run_dir / f"{self.name}.pid", str(self.settings.home))

    # ---- what subclasses provide -------------------------------------------------
    @property
    @abc.abstractmethod
    def address(self) -> str:
        """host:port (or URL) clients use."""

    @abc.abstractmethod
    def installed(self) -> bool:
        """True when ``install`` has completed for the pinned version."""

    @abc.abstractmethod
    def install(self, log: Callable[[str], None]) -> None:
        """Download/build into the cache. Idempotent; may take minutes the first time."""

    @abc.abstractmethod
    def command(self) -> Sequence[str]:
        """argv of the server process. Must contain the state directory path somewhere."""

    @abc.abstractmethod
    def probe(self) -> tuple[bool, str]:
        """One quick health probe (short timeouts): (healthy, detail)."""

    def environment(self) -> Mapping[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("DETECTFLOW_")}

    def prepare(self, log: Callable[[str], None]) -> None:
        """Write configs and initialise storage before a start. Must be idempotent."""
        return None

    def after_start(self, log: Callable[[str], None]) -> None:
        """Idempotent set-up once healthy (topics, buckets, notifications)."""
        return None

    # ---- lifecycle -----------------------------------------------------------------
    def pid(self) -> int | None:
        return self.pidfile.read()

    def launch(self) -> subprocess.Popen[bytes] | None:
        """Start the process unless ours is already running. Returns the new Popen or None."""
        if self.pid() is not None:
            return None
        for d in (self.data, self.conf, self.settings.log_dir, self.settings.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        proc = process.spawn(self.command(), env=self.environment(), cwd=self.data, log_path=self.log_path)
        self.pidfile.write(proc.pid)
        return proc

    def wait_healthy(self, deadline: float, proc: subprocess.Popen[bytes] | None) -> None:
        detail = "no probe yet"
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                self.pidfile.clear()
                raise ServiceStartError(self.name, f"process exited with code {proc.returncode}", self.log_path)
            if proc is None and self.pid() is None:
                raise ServiceStartError(self.name, "process is gone", self.log_path)
            ok, detail = self.probe()
            if ok:
                return
            time.sleep(0.5)
        raise ServiceStartError(self.name, f"not healthy before the deadline ({detail})", self.log_path)

    def stop(self) -> bool:
        """Stop our process if running. Returns True if something was stopped."""
        pid = self.pid()
        if pid is None:
            self.pidfile.clear()
            return False
        process.terminate(pid, timeout_s=self.stop_timeout_s, reap=functools.partial(process.reap, pid))
        self.pidfile.clear()
        return True

    def health(self) -> Health:
        pid = self.pid()
        if pid is None:
            return Health(self.name, self.address, False, False, None, 0, "not running")
        ok, detail = self.probe()
        return Health(self.name, self.address, True, ok, pid, process.resident_bytes(pid), detail)


# ---- probes and install helpers shared by the services ---------------------------------

def tcp_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout_s: float = 2.0, ca_file: Path | None = None) -> tuple[bool, str]:
    """One GET; an https URL's certificate is verified against ``ca_file`` (the project CA), hostname included."""
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as resp:  # noqa: S310 - loopback URL we built
            return 200 <= resp.status < 300, f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, str(getattr(exc, "reason", exc))


def java_binary() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError("java (JDK 17+) is not on PATH")
    return java


def run_logged(argv: Sequence[str], log: Callable[[str], None], *, env: Mapping[str, str] | None = None,
               cwd: Path | None = None, timeout_s: float = 3600) -> None:
    """Run an install step, streaming nothing but keeping its output for the error message."""
    log(f"  $ {' '.join(str(a) for a in argv)}")
    try:
        res = subprocess.run(list(argv), env=None if env is None else dict(env), cwd=cwd,
                             capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"{argv[0]} did not finish within {timeout_s:.0f}s") from exc
    if res.returncode != 0:
        raise StackError(f"{' '.join(str(a) for a in argv)} exited {res.returncode}:\n"
                         f"{(res.stdout + res.stderr)[-4000:]}")


def mark_installed(marker: Path, version: str) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(version + "\n")


def is_marked(marker: Path, version: str) -> bool:
    try:
        return marker.read_text().strip() == version
    except FileNotFoundError:
        return False
