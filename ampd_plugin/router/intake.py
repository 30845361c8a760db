"""What the router accepts from a client before any engine sees it: the API key, the body, its fields.

Every refusal is a `RouterError` in the OpenAI error shape; nothing a client sends can raise a 500.
"""

from __future__ import annotations

import hmac

import orjson
from starlette.requests import ClientDisconnect, Request

from ampd_plugin.router.errors import RouterError, bad_request
from ampd_plugin.router.limits import check_depth, cheap_depth_bound


def authorize(request: Request, key: str | None) -> None:
    """Constant-time check of `Authorization: Bearer KEY` (no key configured: everyone may call)."""
    if not key:
        return
    scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
    # RFC 6750: the scheme name is case-insensitive; the token is compared in constant time.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise RouterError(401, "invalid or missing API key", "auth")


async def read_json(request: Request, limit: int, max_depth: int = 32) -> dict:
    """The request body as a JSON object: 413 beyond `limit` bytes (checked while reading, so an oversize
    body is never buffered whole), 400 when nested deeper than `max_depth`, 499 when the client leaves."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RouterError(413, f"request body exceeds {limit} bytes", "oversize")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RouterError(413, f"request body exceeds {limit} bytes", "oversize")
            chunks.append(chunk)
    except ClientDisconnect:
        raise RouterError(499, "client closed the connection while sending the body", "client_disconnect") from None
    raw = b"".join(chunks)
    if not raw:
        raise bad_request("empty request body; expected a JSON object", "invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", "invalid_json")
    if cheap_depth_bound(raw) > max_depth:  # only bodies with many brackets pay for the walk
        check_depth(body, max_depth)
    return body


def validate(body: dict, chat: bool, served: str | None) -> None:
    """Refuse (400/404) what no engine should see: wrong types, empty prompts, another model's name."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "invalid_field", "model")
    if model and served and model != served:
        raise RouterError(404, f"The model `{model}` does not exist; this router serves `{served}`",
                          "model_not_found", "model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise bad_request("'stream' must be true or false", "invalid_field", "stream")
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad_request(f"'{name}' must be a positive integer", "invalid_field", name)
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad_request("'messages' must be a non-empty list", "empty_prompt", "messages")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
            raise bad_request("each message must be an object with a 'role'", "invalid_field", "messages")
    else:
        p = body.get("prompt")
        ok = (isinstance(p, str) and p != "") or (
            isinstance(p, list) and p and (all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                                           or all(isinstance(t, str) and t for t in p)))
        if not ok:
            raise bad_request("'prompt' must be a non-empty string, list of strings or list of token ids",
                              "empty_prompt", "prompt")
