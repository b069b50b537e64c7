"""clamd with the project signature database."""

from __future__ import annotations

import io

import clamd

from config import StackSettings

# Built from parts so this file itself is not flagged by a scanner.
EICAR = ("X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*").encode()
MARKER = b"DETECTFLOW-TEST-MALWARE-" + b"MARKER-7f3c1a"


def _scanner(stack: StackSettings) -> clamd.ClamdNetworkSocket:
    return clamd.ClamdNetworkSocket(stack.host, stack.clamd_port, timeout=10)


def test_eicar_is_flagged(stack: StackSettings) -> None:
    status, signature = _scanner(stack).instream(io.BytesIO(EICAR))["stream"]
    assert status == "FOUND"
    assert signature.startswith("Detectflow.Test.Eicar")


def test_project_marker_inside_a_jpeg_is_flagged(stack: StackSettings, sample_jpeg: bytes) -> None:
    infected = sample_jpeg[: len(sample_jpeg) // 2] + MARKER + sample_jpeg[len(sample_jpeg) // 2 :]
    status, signature = _scanner(stack).instream(io.BytesIO(infected))["stream"]
    assert (status, signature.split(".UNOFFICIAL")[0]) == ("FOUND", "Detectflow.Test.Marker")


def test_clean_jpeg_passes(stack: StackSettings, sample_jpeg: bytes) -> None:
    assert _scanner(stack).instream(io.BytesIO(sample_jpeg))["stream"] == ("OK", None)
