"""MinIO clients: the one place that builds them, the errors that mean MinIO is away, and the object tags the
buckets' lifecycle rules read.

Every client speaks TLS verified against the project CA with bounded waits (a MinIO that hangs becomes an error,
not a stuck caller) and logs in with one role's key (infra/stack/minio_access.py says what each role may do).
"""

from __future__ import annotations

from pathlib import Path

import urllib3
from minio import Minio
from minio.error import MinioException

from config import MinioCredentials, PipelineSettings, SettingsError

# Object tags the lifecycle rules read (docs/security.md, Deletion and retention). A pre-signed upload is
# tagged unclaimed (a signed header of its URL) until a job names it (the gateway removes the tag); a
# review copy is tagged with the days it is kept (the tenant's policy, one of REVIEW_RETENTION_DAYS).
UNCLAIMED_TAG = ("detectflow-upload", "unclaimed")
RETENTION_TAG = "detectflow-retention-days"

# What a MinIO client raises while MinIO is away, slow or failing (an S3Error with a code, a MinioException, or
# the HTTP layer's errors): a transient failure to each caller, never a bug.
MINIO_ERRORS: tuple[type[Exception], ...] = (MinioException, urllib3.exceptions.HTTPError, OSError)


def https_pool(ca_file: Path | None, *, connect_s: float = 3.0, read_s: float = 30.0, maxsize: int = 8,
               retries: int = 2) -> urllib3.PoolManager:
    """The HTTP client of every MinIO client: TLS verified against ``ca_file`` (the project CA, hostname
    checked), bounded waits (a MinIO that hangs becomes an error, not a stuck caller), retries on 5xx."""
    if ca_file is None:
        raise SettingsError("MinIO speaks TLS only: set DETECTFLOW_TLS_CA_FILE (the CA its certificate is checked "
                            "against)")
    return urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(ca_file),
                               timeout=urllib3.Timeout(connect=connect_s, read=read_s), maxsize=maxsize,
                               retries=urllib3.Retry(total=retries, backoff_factor=0.2,
                                                     status_forcelist=[500, 502, 503, 504]))


def minio_at(endpoint: str, credentials: MinioCredentials, ca_file: Path | None, *, region: str | None = None,
             connect_s: float = 3.0, read_s: float = 30.0, maxsize: int = 8, retries: int = 2) -> Minio:
    """A client of the MinIO at ``endpoint`` holding ``credentials``, over ``https_pool``."""
    http = https_pool(ca_file, connect_s=connect_s, read_s=read_s, maxsize=maxsize, retries=retries)
    return Minio(endpoint, access_key=credentials.access_key, secret_key=credentials.secret_key, secure=True,
                 http_client=http, region=region)


def minio_client(settings: PipelineSettings, role: str) -> Minio:
    """A client holding ``role``'s key, as the pipeline's processes and the registry use it."""
    return minio_at(settings.minio_endpoint, settings.minio_credentials(role), settings.stream.tls_ca_file,
                    connect_s=3.0, read_s=30.0, maxsize=8, retries=2)
