"""How much of a new prompt the session's decode worker already holds: the longest common prefix.

The decode worker holds the last round's prompt followed by what it generated. A new prompt usually
extends exactly that, but some chat templates re-render earlier turns differently — e.g. they drop an
earlier assistant turn's `<think>…</think>` reasoning — so the new prompt and the held tokens agree only
up to some point. What the router may claim as the round's history (`l_hist`, the `history.tokens` the
connector reads) is that common prefix: claiming more would make the holder recompute the rest for the
export (the connector reports it as `history_recomputed_tokens`), claiming nothing wastes the cache.

The comparison is on text (the router keeps the last rendered prompt and the generated text, not the
engine's token ids) and is converted to tokens with the router's tokenizer, one token short of the seam
(a token may merge across it). Token-id prompts and sessions without a remembered prompt are not limited.
A session whose last round another router replica served carries only digests of what it rendered and
what the worker holds: all of it is reusable when the prompt extends the held text, the last prompt's
tokens when it extends only that, nothing otherwise.
"""

from __future__ import annotations

from ampd_plugin.router.sessions import PromptCounter, Session, extends_remote

MAX_OUTPUT_CHARS = 256 * 1024  # generated text kept per session for the comparison (beyond: not kept)


def common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix of `a` and `b` (binary search on C-level slice compares)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def reusable_tokens(s: Session, prompt: str | list[int], counter: PromptCounter) -> int | None:
    """Tokens of `prompt` that the decode worker holding `s` may reuse; None = no limit (the prompt
    extends all it holds, or nothing is known to compare with)."""
    if not isinstance(prompt, str):
        return None
    if not s.last_text:
        if s.remote_held is None:
            return None
        if extends_remote(prompt, s.remote_held):
            return None
        return max(0, s.remote_prefix[2] - 1) if extends_remote(prompt, s.remote_prefix) else 0
    held_prompt, held_out = s.last_text, s.last_output
    if prompt.startswith(held_prompt) and prompt.startswith(held_out, len(held_prompt)):
        return None
    lcp = common_prefix_len(held_prompt + held_out, prompt)
    if lcp >= len(held_prompt):  # the last prompt is kept, the generated text only in part
        return max(0, s.last_text_tokens + counter.count_text(prompt[len(held_prompt):lcp]) - 1)
    return max(0, counter.count_text(prompt[:lcp]) - 1) if lcp else 0
