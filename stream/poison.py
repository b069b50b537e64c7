"""Poison records: a record whose processing kills its process is set aside, not read forever.

A stage that dies inside ``process`` (a decoder killed by the kernel for memory, a native crash, a bug
that raises) has committed nothing, so the restarted process reads the same records again and, without
this, dies again: a crash loop that stops the partition for good. The runner therefore writes the
offsets it is about to process into a marker file before each call and removes it afterwards. A marker
found at start names the batch that was being processed when the process died: each of its offsets gains
a crash. A record with crashes is processed alone (so a later crash names it, not its batch); one with
``max_crashes`` is dead-lettered without being processed again.

The ledger lives on the process's own disk (``<state_dir>/poison/<group>[-<instance>].json``): a
partition that moves to another machine starts counting again there, which bounds the cost of a poison
record at ``max_crashes`` restarts per machine. A process killed from outside mid-batch (kill -9, OOM of
the whole machine) makes its batch suspect once; suspects that then process cleanly are forgotten.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

Offset = tuple[str, int, int]  # (topic, partition, offset) as read, a retry topic's own offset included

FORGET_AFTER_S = 24 * 3600  # a suspect not seen again for a day is dropped (its partition moved or was deleted)


class PoisonLedger:
    def __init__(self, directory: Path | None, name: str, max_crashes: int):
        self.max_crashes = max(1, max_crashes)
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        self.path = None if directory is None else directory / f"{safe}.json"
        self.marker = None if directory is None else directory / f"{safe}.inflight"
        self._suspects: dict[Offset, tuple[int, float]] = {}  # offset -> (crashes, last seen)
        if self.path is not None:
            self._recover()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def crashes(self, offset: Offset) -> int:
        entry = self._suspects.get(offset)
        return 0 if entry is None else entry[0]

    def begin(self, offsets: Iterable[Offset]) -> None:
        """Before processing: name what is in flight (atomically, so a crash never leaves half a marker)."""
        if self.marker is None:
            return
        tmp = Path(f"{self.marker}.tmp")
        tmp.write_text(json.dumps([list(o) for o in offsets]))
        os.replace(tmp, self.marker)

    def end(self, offsets: Iterable[Offset]) -> None:
        """After processing returned: nothing in flight; suspects that got through are forgotten."""
        if self.marker is None:
            return
        self.marker.unlink(missing_ok=True)
        cleared = [o for o in offsets if o in self._suspects]
        if cleared:
            for o in cleared:
                del self._suspects[o]
            self._save()

    def _recover(self) -> None:
        assert self.path is not None and self.marker is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        try:
            for topic, part, off, crashes, seen in json.loads(self.path.read_text()):
                if now - seen < FORGET_AFTER_S:
                    self._suspects[(topic, part, off)] = (crashes, seen)
        except FileNotFoundError:
            pass
        except (ValueError, TypeError) as exc:  # a torn or foreign file: start counting again
            log.warning("poison ledger %s unreadable (%s): starting afresh", self.path, exc)
        try:
            died_in = [tuple(o) for o in json.loads(self.marker.read_text())]
        except FileNotFoundError:
            return
        except (ValueError, TypeError):
            died_in = []
        for topic, part, off in died_in:
            crashes = self.crashes((topic, part, off)) + 1
            self._suspects[(topic, part, off)] = (crashes, now)
        if died_in:
            log.warning("the previous process died processing %d record(s) (%s): each is processed alone now, "
                        "and set aside after %d crashes", len(died_in),
                        ", ".join(f"{t}[{p}]@{o}" for t, p, o in died_in[:5]), self.max_crashes)
        self._save()
        self.marker.unlink(missing_ok=True)

    def _save(self) -> None:
        assert self.path is not None
        tmp = Path(f"{self.path}.tmp")
        tmp.write_text(json.dumps([[t, p, o, c, s] for (t, p, o), (c, s) in self._suspects.items()]))
        os.replace(tmp, self.path)
