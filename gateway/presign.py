"""Pre-signed S3 PUT URLs (AWS Signature V4, query auth) that bind more than the MinIO SDK does.

The SDK's presigned PUT signs only the host, so a holder of the URL could upload any size and type.
Here the content length, the content type and the ``x-amz-meta-detectflow-submitted`` marker are signed
headers: MinIO recomputes the signature from the headers actually sent, so an upload of another size
or type, or without the marker, fails with 403 SignatureDoesNotMatch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import urllib.parse
from collections.abc import Mapping


def _quote(value: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(value, safe=safe)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def presign_put(*, endpoint: str, secure: bool, region: str, access_key: str, secret_key: str, bucket: str,
                key: str, expires_s: int, headers: Mapping[str, str], now: dt.datetime) -> str:
    """The URL; the client must send exactly ``headers`` (plus Host) with its PUT."""
    if not 1 <= expires_s <= 7 * 24 * 3600:
        raise ValueError("expires_s must be within 1 s and 7 days")
    amz_date = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    signed = {"host": endpoint, **{k.lower(): " ".join(str(v).split()) for k, v in headers.items()}}
    names = sorted(signed)
    query = {
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": f"{access_key}/{scope}",
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": str(expires_s),
        "X-Amz-SignedHeaders": ";".join(names),
    }
    canonical_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
    path = "/" + _quote(bucket) + "/" + _quote(key, safe="-_.~/")
    canonical = "\n".join([
        "PUT", path, canonical_query,
        "".join(f"{n}:{signed[n]}\n" for n in names), ";".join(names), "UNSIGNED-PAYLOAD",
    ])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = _hmac(("AWS4" + secret_key).encode(), amz_date[:8])
    for part in (region, "s3", "aws4_request"):
        k = _hmac(k, part)
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    scheme = "https" if secure else "http"
    return f"{scheme}://{endpoint}{path}?{canonical_query}&X-Amz-Signature={signature}"
