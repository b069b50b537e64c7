"""MinIO as the operator sees it: the root key, which only `detectflow stack` and the tests hold."""

from __future__ import annotations

from minio import Minio

from infra.settings import StackSettings


def root_minio(stack: StackSettings) -> Minio:
    creds = stack.minio_credentials()
    return Minio(stack.minio_endpoint, access_key=creds.access_key, secret_key=creds.secret_key, secure=False)
