"""Session tokens: a client's per-shard revisions (what it has seen or written) as one opaque string.

A session read on a shard is served only by a replica that has applied at least the token's
revision for that shard (docs/consistency.md). `Client.session_token()` hands the token to another
client (`Client(..., session=token)`), which then reads its own writes through it.
"""

from __future__ import annotations

import base64
import json

_PREFIX = "kvs1."


def encode_session(session: dict[int, int]) -> str:
    raw = json.dumps({str(k): v for k, v in sorted(session.items())}, separators=(",", ":")).encode()
    return _PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_session(token: str) -> dict[int, int]:
    if not token.startswith(_PREFIX):
        raise ValueError("not a kvstore session token")
    body = token[len(_PREFIX) :]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    return {int(k): int(v) for k, v in json.loads(raw).items()}
