"""Image objects in MinIO, as the stages need them: bounded reads, content-addressed puts, quarantine."""

from __future__ import annotations

import io
from typing import Any

from minio import Minio
from minio.commonconfig import REPLACE, CopySource, Tags
from minio.error import S3Error

from stream.errors import InvalidRecord, TransientError
from stream.objectstore import MINIO_ERRORS, RETENTION_TAG

_MISSING = {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}


class ObjectStore:
    """MinIO reads and writes; missing objects are InvalidRecord, an unreachable MinIO is TransientError."""

    def __init__(self, client: Minio):
        self._client = client

    def get(self, bucket: str, key: str, max_bytes: int) -> bytes:
        try:
            size = self._client.stat_object(bucket, key).size or 0
            if size > max_bytes:
                raise InvalidRecord("IMAGE_TOO_LARGE", f"object is {size} bytes, the limit is {max_bytes}")
            resp = self._client.get_object(bucket, key)
            try:
                data = resp.read(max_bytes + 1)
            finally:
                resp.close()
                resp.release_conn()
        except S3Error as exc:
            if exc.code in _MISSING:
                raise InvalidRecord("OBJECT_NOT_FOUND", f"{bucket}/{key} does not exist") from exc
            raise TransientError(f"minio: {exc.code}") from exc
        except MINIO_ERRORS as exc:
            raise TransientError(f"minio unavailable: {type(exc).__name__}") from exc
        if len(data) > max_bytes:
            raise InvalidRecord("IMAGE_TOO_LARGE", f"object is over the limit of {max_bytes} bytes")
        return data

    def put(self, bucket: str, key: str, data: bytes, content_type: str | None = None,
            metadata: dict[str, Any] | None = None) -> None:
        try:
            self._client.put_object(bucket, key, io.BytesIO(data), len(data),
                                    content_type=content_type or "application/octet-stream", metadata=metadata)
        except MINIO_ERRORS as exc:
            raise TransientError(f"minio unavailable: {type(exc).__name__}") from exc

    def remove(self, bucket: str, key: str) -> None:
        """Delete an object; a missing one is not an error (S3 semantics), so a redelivery is harmless."""
        try:
            self._client.remove_object(bucket, key)
        except MINIO_ERRORS as exc:
            raise TransientError(f"minio unavailable: {type(exc).__name__}") from exc

    def review_copy(self, dest_bucket: str, dest_key: str, *, retention_days: int, data: bytes | None = None,
                    source: tuple[str, str] | None = None) -> bool:
        """Copy a flagged image to the review bucket (server-side from its object, or its bytes), tagged with
        its retention for the bucket's lifecycle rules. Idempotent (same key). False when the source is gone."""

        tags = Tags.new_object_tags()
        tags[RETENTION_TAG] = str(retention_days)
        try:
            if source is not None:
                try:
                    self._client.copy_object(dest_bucket, dest_key, CopySource(*source), tags=tags,
                                             tagging_directive=REPLACE)
                except S3Error as exc:
                    if exc.code in _MISSING:
                        return False
                    raise
            elif data is not None:
                self._client.put_object(dest_bucket, dest_key, io.BytesIO(data), len(data), tags=tags)
            else:
                return False
        except MINIO_ERRORS as exc:
            raise TransientError(f"minio unavailable: {type(exc).__name__}") from exc
        return True

    def quarantine(self, dest_bucket: str, dest_key: str, *, data: bytes | None = None,
                   source: tuple[str, str] | None = None, metadata: dict[str, Any] | None = None) -> None:
        """Move an infected object out of reach (copy, then delete the original), or store inline bytes there.

        Idempotent: a redelivered record finds the copy done and the original already gone.
        """
        try:
            if source is not None:
                bucket, key = source
                try:
                    self._client.copy_object(dest_bucket, dest_key, CopySource(bucket, key), metadata=metadata,
                                             metadata_directive="REPLACE" if metadata else None)
                except S3Error as exc:
                    if exc.code not in _MISSING:
                        raise
                self._client.remove_object(bucket, key)
            elif data is not None:
                self.put(dest_bucket, dest_key, data, metadata=metadata)
        except MINIO_ERRORS as exc:
            raise TransientError(f"minio unavailable: {type(exc).__name__}") from exc
