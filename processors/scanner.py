"""clamd over TCP (INSTREAM), failing closed: no verdict means no image goes on."""

from __future__ import annotations

import io
from dataclasses import dataclass

import clamd

from stream.errors import InvalidRecord, TransientError


@dataclass(frozen=True)
class ScanVerdict:
    clean: bool
    signature: str | None = None


class ClamdScanner:
    def __init__(self, host: str, port: int, timeout_s: float):
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._version: str | None = None

    def _client(self) -> clamd.ClamdNetworkSocket:
        return clamd.ClamdNetworkSocket(self.host, self.port, timeout=self.timeout_s)

    @property
    def name(self) -> str:
        if self._version is None:
            try:
                self._version = str(self._client().version()).split("/")[0].strip()
            except (clamd.ClamdError, OSError):
                return "clamd"
        return self._version

    def scan(self, data: bytes) -> ScanVerdict:
        try:
            reply = self._client().instream(io.BytesIO(data))
        except clamd.BufferTooLongError as exc:
            # Over clamd's StreamMaxLength: unscannable, so refused (fail closed); retrying cannot help.
            raise InvalidRecord("IMAGE_TOO_LARGE", f"clamd refused the stream as too long: {exc}") from exc
        except (TimeoutError, clamd.ClamdError, OSError) as exc:
            raise TransientError(f"clamd unavailable: {type(exc).__name__}: {exc}") from exc
        status, signature = reply.get("stream", ("ERROR", "no verdict"))
        if status == "OK":
            return ScanVerdict(True)
        if status == "FOUND":
            return ScanVerdict(False, (signature or "unknown").removesuffix(".UNOFFICIAL"))
        raise TransientError(f"clamd gave no verdict: {status} {signature}")
