"""Credentials files: generated once, kept 0600, read on use; a secret is never part of a repr."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from config.base import SettingsError


def write_private(path: Path, data: bytes) -> None:
    """Write a secret: the file 0600 (atomically, replacing any), its directory 0700."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class MinioCredentials:
    """Root credentials of the local MinIO, generated once and kept 0600."""

    access_key: str
    secret_key: str = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> MinioCredentials:
        try:
            data = json.loads(path.read_text())
            return cls(access_key=data["access_key"], secret_key=data["secret_key"])
        except (OSError, ValueError, KeyError) as exc:
            raise SettingsError(f"cannot read MinIO credentials {path} ({type(exc).__name__}); "
                                "`detectflow stack up` creates them") from exc

    @classmethod
    def load_or_create(cls, path: Path, access_key: str | None = None) -> MinioCredentials:
        if path.exists():
            return cls.load(path)
        creds = cls(access_key=access_key or "detectflow-" + secrets.token_hex(4), secret_key=secrets.token_urlsafe(32))
        write_private(path, json.dumps({"access_key": creds.access_key, "secret_key": creds.secret_key}).encode())
        return creds


@dataclass(frozen=True)
class Login:
    """A username and password (a Cassandra role, a Kafka SCRAM principal), generated once and kept 0600."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> Login:
        try:
            data = json.loads(path.read_text())
            return cls(username=data["username"], password=data["password"])
        except (OSError, ValueError, KeyError) as exc:
            raise SettingsError(f"cannot read credentials {path} ({type(exc).__name__}); "
                                "`detectflow stack up` creates them") from exc

    @classmethod
    def load_or_create(cls, path: Path, username: str) -> Login:
        if path.exists():
            return cls.load(path)
        return cls.create(path, username)

    @classmethod
    def create(cls, path: Path, username: str) -> Login:
        """New credentials written over ``path`` (0600, atomically): a new password for ``username``."""
        creds = cls(username=username, password=secrets.token_urlsafe(32))
        write_private(path, json.dumps({"username": creds.username, "password": creds.password}).encode())
        return creds
