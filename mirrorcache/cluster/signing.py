"""The shared-secret signature on peer requests: HMAC-SHA256 over method, path (with its
query, so the stated upstream and repository are covered) and a timestamp."""

from __future__ import annotations

import hashlib
import hmac
import re

#: Header carrying the signing time (unix seconds).
TIME_HEADER = "X-Mirrorcache-Peer-Time"
#: Header carrying the hex HMAC.
SIGNATURE_HEADER = "X-Mirrorcache-Peer-Signature"
#: Largest accepted difference between the signer's clock and ours.
MAX_SKEW = 60.0

_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def sign(secret: str, method: str, path_qs: str, timestamp: int) -> str:
    msg = f"{method.upper()}\n{path_qs}\n{timestamp}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def headers(secret: str, method: str, path_qs: str, now: float) -> dict[str, str]:
    ts = int(now)
    return {TIME_HEADER: str(ts), SIGNATURE_HEADER: sign(secret, method, path_qs, ts)}


def verify(secret: str, method: str, path_qs: str, timestamp: str | None,
           signature: str | None, now: float) -> str | None:
    """None when the request is signed with ``secret`` and fresh, else why not."""
    if not secret:
        return "no cluster secret configured"
    if not timestamp or not signature:
        return "unsigned"
    # Checked as ASCII before use: int() takes other digits and whitespace, and a
    # non-ASCII signature cannot be compared as bytes.
    if not _TIMESTAMP.fullmatch(timestamp):
        return "bad timestamp"
    if not _SIGNATURE.fullmatch(signature):
        return "bad signature"
    ts = int(timestamp)
    if abs(now - ts) > MAX_SKEW:
        return "timestamp outside the allowed skew"
    want = sign(secret, method, path_qs, ts)
    if not hmac.compare_digest(want.encode(), signature.encode()):
        return "bad signature"
    return None
