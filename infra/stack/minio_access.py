"""MinIO users and policies, one per role: each process holds a key that can do only what its role does.

Nothing but `detectflow stack` uses MinIO's root credentials. Each role's credentials are made once into
``<secrets>/minio/<role>.json`` (0600) and its policy is written again on every `stack up`, so a change
of rights here reaches a running stack at its next `up`.

The gateway holds two keys. Its pre-signed upload URLs are signed with ``gateway-signer``, which may only
``PutObject`` under ``uploads/``: MinIO runs a pre-signed PUT that carries an (unsigned)
``x-amz-copy-source`` header as a CopyObject with the signer's rights, and a CopyObject needs
``GetObject`` on its source, so such a request is refused with 403 AccessDenied whichever object (of
whichever tenant, existing or not) it names. Its own calls (store a sync image, check an upload before
using it, delete on request) use ``gateway``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from minio.error import MinioAdminException

from config import MinioCredentials, StackSettings

GET, PUT, DELETE, LIST = "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"
# Tags drive the lifecycle rules (infra/stack/minio.py): an upload's URL tags it unclaimed, the gateway
# removes the tag when a job claims it; review copies carry their retention.
TAG, UNTAG = "s3:PutObjectTagging", "s3:DeleteObjectTagging"

# role -> area -> actions. An area is one of the stack's buckets by its default name.
ROLE_RIGHTS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "gateway-signer": {"uploads": (PUT, TAG)},
    # A tenant's erasure (DELETE /v1/tenants/{tenant}/data) lists and removes its objects in every bucket.
    "gateway": {"uploads": (GET, PUT, DELETE, LIST, TAG, UNTAG), "quarantine": (DELETE, LIST),
                "review": (DELETE, LIST), "derived": (DELETE, LIST)},
    # A system that submits images through Kafka and uploads large ones first (`detectflow detect`).
    "client": {"uploads": (PUT,)},
    # scan reads the image and moves an infected one to quarantine (copy, then delete the original).
    "scan": {"uploads": (GET, DELETE), "quarantine": (PUT,), "review": (PUT, TAG), "models": (GET,)},
    "preprocess": {"uploads": (GET,), "models": (GET,)},
    "inference": {"models": (GET,)},
    # postprocess copies an image its tenant's policy flags to the review bucket (server-side).
    # It removes the upload of an image deleted while its request was past scan.
    "postprocess": {"models": (GET,), "uploads": (GET, DELETE), "review": (PUT, TAG)},
    "shadow": {"models": (GET,)},
    "monitor": {"models": (GET, LIST)},
    # `detectflow models` (push, purge) and the demo's bootstrap: the only writer of model files.
    "registry": {"models": (GET, PUT, DELETE, LIST)},
}
ROLES = tuple(ROLE_RIGHTS)
_BUCKET_ACTIONS = {LIST}  # apply to the bucket itself, not to its objects


def access_key(role: str) -> str:
    return f"detectflow-{role}"


def policy_name(role: str, suffix: str = "") -> str:
    return f"detectflow-{role}{suffix}"


def policy_document(rights: Mapping[str, tuple[str, ...]], buckets: Mapping[str, str] | None = None) -> dict[str, Any]:
    """An S3 policy granting ``rights`` (area -> actions); ``buckets`` renames areas (the test suite's own)."""
    statements = []
    for area, actions in rights.items():
        bucket = (buckets or {}).get(area, area)
        objects = sorted(set(actions) - _BUCKET_ACTIONS)
        if objects:
            statements.append({"Effect": "Allow", "Action": objects, "Resource": [f"arn:aws:s3:::{bucket}/*"]})
        on_bucket = sorted({"s3:GetBucketLocation", *(set(actions) & _BUCKET_ACTIONS)})
        statements.append({"Effect": "Allow", "Action": on_bucket, "Resource": [f"arn:aws:s3:::{bucket}"]})
    return {"Version": "2012-10-17", "Statement": statements}


def attach(admin: Any, policy: str, user: str) -> None:
    try:
        admin.attach_policy([policy], user=user)
    except MinioAdminException as exc:
        if "AlreadyApplied" not in str(exc):
            raise


def detach(admin: Any, policy: str, user: str) -> None:
    try:
        admin.detach_policy([policy], user=user)
    except MinioAdminException as exc:
        if "AlreadyApplied" not in str(exc):  # was not attached
            raise


def ensure_role_users(admin: Any, settings: StackSettings, log: Callable[[str], None] = lambda _m: None) -> None:
    """Each role's user (credentials made once, 0600) with its policy, through ``admin`` (a MinioAdmin holding
    the root key: infra/stack/minio.py admin_client); idempotent."""
    for role, rights in ROLE_RIGHTS.items():
        creds = MinioCredentials.load_or_create(settings.minio_roles_dir / f"{role}.json", access_key=access_key(role))
        admin.user_add(creds.access_key, creds.secret_key)
        admin.policy_add(policy_name(role), policy=policy_document(rights))
        attach(admin, policy_name(role), creds.access_key)
    log(f"  minio: {len(ROLE_RIGHTS)} role users, each with its own policy (credentials in {settings.minio_roles_dir})")


def grant_area(admin: Any, area: str, bucket: str, suffix: str) -> list[str]:
    """Give every role that may use ``area`` the same rights on ``bucket`` as an extra policy (the test
    suite's own models bucket); returns the policies made, for ``revoke_area``."""
    made = []
    for role, rights in ROLE_RIGHTS.items():
        if area in rights:
            name = policy_name(role, suffix)
            admin.policy_add(name, policy=policy_document({area: rights[area]}, {area: bucket}))
            attach(admin, name, access_key(role))
            made.append(name)
    return made


def revoke_area(admin: Any, suffix: str) -> None:
    """Remove what ``grant_area`` made (nothing, when an earlier run cleaned up already)."""
    existing = json.loads(admin.policy_list() or "{}")
    for role in ROLE_RIGHTS:
        name = policy_name(role, suffix)
        if name in existing:
            detach(admin, name, access_key(role))
            admin.policy_remove(name)
