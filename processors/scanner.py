"""clamd over TCP (INSTREAM), failing closed: no verdict means no image goes on."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import clamd

from stream.errors import InvalidRecord, TransientError


@dataclass(frozen=True)
class ScanVerdict:
    clean: bool
    signature: str | None = None


# clamd's INSTREAM takes length-prefixed chunks; the clamd package sends 1 KiB ones with send(),
# which costs a syscall per KiB (~770 for a 770 KB PNG) and may send short. Large chunks with
# sendall() are ~3x faster here. Must stay below clamd's StreamMaxLength.
CHUNK_BYTES = 256 * 1024


def send_stream(sock: socket.socket, data: bytes) -> None:
    """The INSTREAM body after the command: length-prefixed chunks, then a zero length."""
    view = memoryview(data)
    for start in range(0, len(data), CHUNK_BYTES):
        chunk = view[start:start + CHUNK_BYTES]
        sock.sendall(struct.pack("!L", len(chunk)))
        sock.sendall(chunk)
    sock.sendall(struct.pack("!L", 0))


class _Clamd(clamd.ClamdNetworkSocket):
    def instream_bytes(self, data: bytes) -> tuple[str, str | None]:
        try:
            self._init_socket()
            self._send_command("INSTREAM")
            send_stream(self.clamd_socket, data)
            result = self._recv_response()
            if result == "INSTREAM size limit exceeded. ERROR":
                raise clamd.BufferTooLongError(result)
            _filename, reason, status = self._parse_response(result)
            return status, reason
        finally:
            self._close_socket()


class ClamdScanner:
    def __init__(self, host: str, port: int, timeout_s: float):
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._version: str | None = None

    def _client(self) -> _Clamd:
        return _Clamd(self.host, self.port, timeout=self.timeout_s)

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
            status, signature = self._client().instream_bytes(data)
        except clamd.BufferTooLongError as exc:
            # Over clamd's StreamMaxLength: unscannable, so refused (fail closed); retrying cannot help.
            raise InvalidRecord("IMAGE_TOO_LARGE", f"clamd refused the stream as too long: {exc}") from exc
        except (TimeoutError, clamd.ClamdError, OSError) as exc:
            raise TransientError(f"clamd unavailable: {type(exc).__name__}: {exc}") from exc
        if status == "OK":
            return ScanVerdict(True)
        if status == "FOUND":
            return ScanVerdict(False, (signature or "unknown").removesuffix(".UNOFFICIAL"))
        raise TransientError(f"clamd gave no verdict: {status} {signature}")
