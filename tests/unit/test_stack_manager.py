"""The stack manager's ordering, idempotence and failure reporting, with fake services."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest

from config import StackSettings
from infra.stack import manager
from infra.stack.base import Service, ServiceStartError

STARTED: list[str] = []


class _Fake(Service):
    """Runs a tiny python process; healthy once its ready-file exists."""

    exit_code: int | None = None

    @property
    def address(self) -> str:
        return f"fake://{self.name}"

    def installed(self) -> bool:
        return (self.opt / "ok").exists()

    def install(self, log: Callable[[str], None]) -> None:
        self.opt.mkdir(parents=True, exist_ok=True)
        (self.opt / "ok").touch()

    def command(self) -> Sequence[str]:
        STARTED.append(self.name)
        ready = self.data / "ready"
        ready.unlink(missing_ok=True)
        if self.exit_code is not None:
            code = f"import sys; print('boom from {self.name}'); sys.exit({self.exit_code})"
        else:
            code = f"import pathlib, time; pathlib.Path({str(ready)!r}).touch(); time.sleep(300)"
        return [sys.executable, "-c", code, str(self.settings.home)]

    def probe(self) -> tuple[bool, str]:
        ok = (self.data / "ready").exists()
        return ok, "ready" if ok else "starting"


class Base(_Fake):
    name = "base"


class Dependent(_Fake):
    name = "dependent"
    depends_on = ("base",)


class Broken(_Fake):
    name = "broken"
    exit_code = 3


@pytest.fixture
def fake_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> StackSettings:
    monkeypatch.setattr(manager, "SERVICE_CLASSES", {
        "base": f"{__name__}:Base", "dependent": f"{__name__}:Dependent", "broken": f"{__name__}:Broken",
    })
    STARTED.clear()
    settings = StackSettings(home=tmp_path, start_timeout_s=20)
    yield settings
    manager.down(settings)


def test_up_starts_dependencies_first_and_is_idempotent(fake_stack: StackSettings) -> None:
    manager.up(fake_stack, ["dependent"], log=lambda _m: None)
    assert STARTED == ["base", "dependent"]
    rows = {h.name: h for h in manager.status(fake_stack, ["dependent"])}
    assert rows["base"].healthy and rows["dependent"].healthy
    assert rows["base"].rss_bytes > 0
    manager.up(fake_stack, ["dependent"], log=lambda _m: None)
    assert STARTED == ["base", "dependent"], "a second up must not start anything again"


def test_down_stops_and_status_reports_down(fake_stack: StackSettings) -> None:
    manager.up(fake_stack, ["dependent"], log=lambda _m: None)
    manager.down(fake_stack, log=lambda _m: None)
    assert [h.running for h in manager.status(fake_stack, ["dependent"])] == [False, False]


def test_a_failing_service_is_named_with_its_log(fake_stack: StackSettings) -> None:
    with pytest.raises(ServiceStartError) as info:
        manager.up(fake_stack, ["broken"], log=lambda _m: None)
    assert info.value.service == "broken"
    assert str(info.value.log_path).endswith("broken.log")
    assert "boom from broken" in str(info.value)


def test_unknown_service_is_refused(fake_stack: StackSettings) -> None:
    with pytest.raises(Exception, match="unknown service"):
        manager.load_services(fake_stack, ["nope"])



def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_stopping_a_service_leaves_other_childrens_exit_status_to_their_owner(fake_stack: StackSettings) -> None:
    # The chaos drill restarts services from the process whose supervisor runs the roles: stopping a service must
    # reap that service only, or a role that exited meanwhile is reported as having exited with 0.
    manager.up(fake_stack, ["base"], log=lambda _m: None)
    role = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    try:
        deadline = time.monotonic() + 20
        while not _zombie(role.pid):  # exited, its status not collected yet
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        manager.down(fake_stack, ["base"], log=lambda _m: None)
        assert not manager.status(fake_stack, ["base"])[0].running
        assert role.wait(timeout=20) == 3
    finally:
        if role.poll() is None:
            role.kill()
