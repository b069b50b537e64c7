"""clamd.conf rendering and the pure parts of `detectflow bench clamd` (no clamd)."""

from __future__ import annotations

from pathlib import Path

from infra.bench_clamd import ndb_signatures
from infra.stack.clamd import SCAN_OPTIONS, SIGNATURE_DIR, render_conf


def _conf(**options: str) -> list[str]:
    kwargs = {"options": options} if options else {}
    return render_conf(port=3399, host="127.0.0.1", db_dir=Path("/db"), tmp_dir=Path("/spool"),
                       log_path=Path("/log"), pid_file=Path("/pid"), stream_max_bytes=32 * 1024 * 1024,
                       **kwargs).splitlines()


def test_the_stack_conf_skips_image_decoding_and_keeps_its_limits() -> None:
    lines = _conf()
    for line in ("Bytecode no", "ScanImage no", "ScanImageFuzzyHash no", "StreamMaxLength 32M",
                 "MaxScanSize 64M", "TCPSocket 3399", "TemporaryDirectory /spool"):
        assert line in lines
    assert len({line.split()[0] for line in lines}) == len(lines)  # clamd refuses an option given twice


def test_other_scan_options_replace_the_shipped_ones() -> None:
    lines = _conf(Bytecode="no", HeuristicAlerts="no")
    assert "HeuristicAlerts no" in lines
    assert not any(line.startswith("ScanImage") for line in lines)
    assert SCAN_OPTIONS["ScanImage"] == "no"


def test_ndb_signatures_yield_the_bytes_they_match() -> None:
    text = "Plain.Sig:0:*:41424344\nWild.Sig:0:*:4142??44\n# comment\nShort:0\n"
    sigs = ndb_signatures(text)
    assert [(s.name, s.body) for s in sigs] == [("Plain.Sig", b"ABCD")]


def test_the_project_signatures_are_all_plain_hex() -> None:
    # The bench builds its detection cases from them: a wildcard signature would go untested.
    for f in SIGNATURE_DIR.glob("*.ndb"):
        lines = [line for line in f.read_text().splitlines() if line.strip() and not line.startswith("#")]
        assert len(ndb_signatures(f.read_text())) == len(lines)
