"""The gateway's MinIO calls, awaitable (the SDK is synchronous: calls run in a bounded executor)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import hashlib
import hmac
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from config import GatewaySettings
from gateway.presign import presign_put
from gateway.problems import Problem
from stream.bridge import SUBMITTED_MARK
from stream.objectstore import MINIO_ERRORS, UNCLAIMED_TAG, minio_at

T = TypeVar("T")
_MISSING = {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}


@dataclass(frozen=True)
class UploadGrant:
    """What a pre-signed upload URL allows: one object, one content type, one exact length."""

    key: str
    content_type: str
    length: int


def upload_marker(secret: bytes, grant: UploadGrant) -> str:
    """The marker metadata value a pre-signed upload must carry: its signed length and a MAC over the grant.

    MinIO enforces the signed headers on the PUT itself; the marker lets the gateway check, before it uses
    an upload, that the object there is what it signed for (not a copy, not another writer's object).
    """
    mac = hmac.new(secret, f"detectflow-upload\n{grant.key}\n{grant.content_type}\n{grant.length}".encode(),
                   hashlib.sha256).hexdigest()
    return f"{grant.length}.{mac}"


class GatewayObjects:
    def __init__(self, settings: GatewaySettings, *, threads: int = 16):
        p = settings.pipeline
        # Two keys (infra/stack/minio_access.py): pre-signed URLs are signed with one that can only put
        # uploads, so a URL holder can never read or copy anything; the gateway's own calls use the other.
        own = p.minio_credentials("gateway")
        self._signer = p.minio_credentials("gateway-signer")
        self._marker_secret = hashlib.sha256(b"detectflow-upload-marker\n" + self._signer.secret_key.encode()).digest()
        self.client = minio_at(p.minio_endpoint, own, p.stream.tls_ca_file, region=settings.minio_region,
                               connect_s=3.0, read_s=20.0, maxsize=threads, retries=1)
        self.bucket = p.uploads_bucket
        self.settings = settings
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="gateway-minio")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except S3Error as exc:
            if exc.code in _MISSING:
                raise Problem("NOT_FOUND", "no such object") from exc
            raise Problem("UNAVAILABLE", f"object store error {exc.code}") from exc
        except MINIO_ERRORS as exc:
            raise Problem("UNAVAILABLE", f"the object store did not answer ({type(exc).__name__})") from exc

    async def put_image(self, key: str, data: bytes, media_type: str) -> None:
        """Store bytes the gateway already submits itself (so the bridge ignores the notification)."""
        await self._run(lambda: self.client.put_object(self.bucket, key, io.BytesIO(data), len(data),
                                                       content_type=media_type,
                                                       metadata={SUBMITTED_MARK: "true"}))

    async def size(self, key: str) -> int:
        stat = await self._run(lambda: self.client.stat_object(self.bucket, key))
        return int(stat.size or 0)

    async def verified_upload_size(self, key: str) -> int:
        """The size of a pre-signed upload, after checking that the object is the one the gateway signed for:
        its marker names this key, its type and its size. UPLOAD_MISMATCH otherwise (the caller audits it)."""
        stat = await self._run(lambda: self.client.stat_object(self.bucket, key))
        size = int(stat.size or 0)
        meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        marker = meta.get(f"x-amz-meta-{SUBMITTED_MARK}", "")
        content_type = (stat.content_type or "").split(";")[0].strip().lower()
        expected = upload_marker(self._marker_secret, UploadGrant(key, content_type, size))
        if not hmac.compare_digest(marker.encode(), expected.encode()):
            raise Problem("UPLOAD_MISMATCH", "the object at this upload id is not the upload this gateway signed "
                                             "(size, type or marker differ)")
        return size

    async def exists(self, key: str) -> bool:
        try:
            await self.size(key)
            return True
        except Problem as exc:
            if exc.code == "NOT_FOUND":
                return False
            raise

    async def remove(self, key: str) -> None:
        await self._run(lambda: self.client.remove_object(self.bucket, key))

    async def claim_upload(self, key: str) -> None:
        """A job names this upload: drop its unclaimed tag, so the bucket's retention (not the short unclaimed
        expiry) applies. Idempotent; a missing upload is left to the pipeline (OBJECT_NOT_FOUND)."""
        try:
            await self._run(lambda: self.client.delete_object_tags(self.bucket, key))
        except Problem as exc:
            if exc.code != "NOT_FOUND":
                raise

    async def erase_prefix(self, prefix: str, buckets: tuple[str, ...]) -> dict[str, int]:
        """Remove every object under ``prefix`` in each bucket; bucket -> objects removed."""
        def erase(bucket: str) -> int:
            names = [o.object_name for o in self.client.list_objects(bucket, prefix=prefix, recursive=True)]
            for start in range(0, len(names), 1000):
                errors = list(self.client.remove_objects(bucket, [DeleteObject(n) for n in names[start:start + 1000]]))
                if errors:
                    raise Problem("UNAVAILABLE", f"could not remove {len(errors)} objects from {bucket}")
            return len(names)

        counts = {}
        for bucket in buckets:
            try:
                counts[bucket] = await self._run(lambda b=bucket: erase(b))  # type: ignore[misc]
            except Problem as exc:
                if exc.code != "NOT_FOUND":  # no such bucket: nothing to erase there
                    raise
                counts[bucket] = 0
        return counts

    async def ping(self) -> None:
        if not await self._run(lambda: self.client.bucket_exists(self.bucket)):
            raise Problem("UNAVAILABLE", f"bucket {self.bucket} is missing")

    def presigned_put(self, key: str, content_type: str, content_length: int) -> tuple[str, dict[str, str], int]:
        """(url, headers the client must send, expiry epoch seconds)."""
        now = dt.datetime.now(dt.UTC)
        ttl = self.settings.upload_url_ttl_s
        marker = upload_marker(self._marker_secret, UploadGrant(key, content_type, content_length))
        headers = {"Content-Type": content_type, "Content-Length": str(content_length),
                   f"x-amz-meta-{SUBMITTED_MARK}": marker,
                   # Signed: the upload carries it, and the uploads bucket's lifecycle rule expires it unless a
                   # job claims it (claim_upload) within DETECTFLOW_UNCLAIMED_UPLOAD_DAYS.
                   "x-amz-tagging": "=".join(UNCLAIMED_TAG)}
        url = presign_put(endpoint=self.settings.public_minio_endpoint, secure=True,
                          region=self.settings.minio_region, access_key=self._signer.access_key,
                          secret_key=self._signer.secret_key, bucket=self.bucket, key=key, expires_s=ttl,
                          headers=headers, now=now)
        return url, headers, int(now.timestamp()) + ttl


