"""MinIO as the operator sees it: the root key, which only `detectflow stack` and the tests hold."""

from __future__ import annotations

from minio import Minio

from config import MinioCredentials, StackSettings
from infra.stack.minio import https_pool


def minio_as(stack: StackSettings, creds: MinioCredentials) -> Minio:
    """A client holding ``creds``, over HTTPS verified against the project CA (MinIO serves nothing else)."""
    return Minio(stack.minio_endpoint, access_key=creds.access_key, secret_key=creds.secret_key, secure=True,
                 http_client=https_pool(stack.tls_ca_file))


def root_minio(stack: StackSettings) -> Minio:
    return minio_as(stack, stack.minio_credentials())
