"""Credentials out of what bitray prints: every URI in a message, log line or warning goes through
``redacted``.

MLflow tracking URIs (``http://user:password@mlflow:5000``, ``postgresql://user:password@db/mlflow``) and
S3-compatible endpoints (``http://key:secret@minio:9000``) may carry a password in their user info, and
signed or token HTTP(S) URLs carry one in their query (only HTTP(S) queries are touched: ``?`` is an
ordinary character of S3 and GCS keys). ``redacted`` keeps the rest of the text, so the message
still names the host, and replaces only the secrets with ``***``.
"""

from __future__ import annotations

import re

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/?#@:'\"]*):[^\s/?#@'\"]*@")
_HTTP_URL = re.compile(r"\bhttps?://[^\s'\"]+", re.IGNORECASE)
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;](?:password|passwd|pwd|token|access_token|secret|client_secret|api_key|apikey|key|sig"
    r"|signature|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential)=)"
    r"[^&;#\s'\"]*",
    re.IGNORECASE,
)


def redacted(text: object) -> str:
    """``text`` (a URI, or a message holding URIs) with passwords and secret query values masked.

    >>> redacted("MLflow at http://me:hunter2@mlflow:5000/?token=abc is down")
    'MLflow at http://me:***@mlflow:5000/?token=*** is down'
    """
    masked = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", str(text))
    return _HTTP_URL.sub(lambda url: _SECRET_QUERY.sub(lambda m: f"{m['name']}{MASK}", url[0]), masked)
