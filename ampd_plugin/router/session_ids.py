"""Which session ids a client may send, and how one that is not a plain token becomes safe.

A session id picks the decode worker and the KV hold of every later round, is sent to the engines and
written to the logs. An id with control characters could forge log lines; two long ids cut to one length
would share a session. So ids named for the purpose (the `X-Session-ID` header, the `session_id` and
`conversation_id` fields) must be a plain token — else 400, with the rule in the message — while the
OpenAI `user` field, which clients fill with whatever names their end user (an e-mail, a display name),
is accepted as is and replaced by a digest when it is not a plain token.
"""

from __future__ import annotations

import hashlib
import re

from ampd_plugin.router.errors import bad_request

MAX_SESSION_ID_LEN = 128
ALLOWED = "letters, digits and . _ : @ + -"
_PLAIN = re.compile(r"[A-Za-z0-9._:@+\-]{1,%d}" % MAX_SESSION_ID_LEN)


def is_plain(sid: str) -> bool:
    return _PLAIN.fullmatch(sid) is not None


def checked(sid: str, source: str) -> str:
    """`sid` if it is a plain token; a 400 naming `source` and the rule otherwise."""
    if is_plain(sid):
        return sid
    why = (f"is {len(sid)} characters long (at most {MAX_SESSION_ID_LEN})" if len(sid) > MAX_SESSION_ID_LEN
           else f"may hold only {ALLOWED}")
    raise bad_request(f"session id from {source} {why}", kind="invalid_session_id", param=source)


def from_user_field(user: str) -> str:
    """The `user` field as a session id: itself when plain, else a stable digest of it."""
    if is_plain(user):
        return user
    return "user-" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def for_log(text: object, limit: int = 200) -> str:
    """A client-chosen string as it may appear in a log line: control characters escaped, length bounded."""
    s = str(text)
    escaped = s[:limit].encode("unicode_escape", "backslashreplace").decode("ascii")
    return escaped + ("…" if len(s) > limit else "")
