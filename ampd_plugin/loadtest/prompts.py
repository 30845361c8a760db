"""Synthetic tool/retrieval results of a given length in tokens of the target model's tokenizer.

A workload says "round k appends 704 new tokens"; the server only sees text. To make the token count
come out right we build the text from words that are single tokens of the *target* tokenizer (read from
its vocabulary), joined by spaces — whitespace-splitting pre-tokenizers (byte-level BPE, Metaspace,
Whitespace) never merge across a space, so n words ≈ n tokens — then count the result with the same
tokenizer and add or drop words until it is exact (a few passes at most). The chat template adds a few
tokens per message on top; that is the only approximation.

Without a tokenizer (an unknown remote model) we fall back to common English words at an assumed
0.75 words per token, which is typical for GPT-style BPE vocabularies, and say so in the report.

Text is a pure function of (seed, session id, round index, salt), so every policy in a comparison gets
the same prompts, and different sessions never share a prefix by accident.
"""

from __future__ import annotations

import hashlib
import logging
import random
from functools import cached_property
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

_FALLBACK_WORDS = (
    "the result of query table value report index record source field status update system data "
    "search tool output entry page item number list time date price city river market paper author "
    "title section note year level group model score answer question review summary document file "
    "version change error range total count event state region country company product order line"
).split()
FALLBACK_WORDS_PER_TOKEN = 0.75


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class TextSynthesizer:
    """Makes text of (approximately, with a tokenizer exactly) n tokens."""

    def __init__(self, tokenizer: Tokenizer | None = None, seed: int = 0, salt: str = "") -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.salt = salt

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return round(len(text.split()) / FALLBACK_WORDS_PER_TOKEN)
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    @cached_property
    def words(self) -> list[str]:
        """Words that are one token each for the target tokenizer (fallback: a fixed English list)."""
        if self.tokenizer is None:
            return list(_FALLBACK_WORDS)
        words = _single_token_words(self.tokenizer)
        if len(words) < 50:
            log.warning("tokenizer has few single-token words (%d); token counts may drift", len(words))
            words = words or list(_FALLBACK_WORDS)
        return words

    def text(self, n_tokens: int, session_id: str, round_index: int) -> str:
        """Text of n_tokens tokens, a pure function of the seed, the salt, the session and the round."""
        if n_tokens <= 0:
            return ""
        digest = hashlib.sha256(f"{self.seed}/{self.salt}/{session_id}/{round_index}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        if self.tokenizer is None:
            n_words = max(1, round(n_tokens * FALLBACK_WORDS_PER_TOKEN))
            return " ".join(rng.choice(self.words) for _ in range(n_words))
        pool = [rng.choice(self.words) for _ in range(n_tokens + 64)]
        k = n_tokens
        for _ in range(8):  # converges in 1–2 passes when words are single tokens
            text = " ".join(pool[:k])
            diff = n_tokens - self.count(text)
            if diff == 0:
                break
            k = max(1, k + diff)
            while k > len(pool):
                pool.append(rng.choice(self.words))
        return text


def _single_token_words(tokenizer: Tokenizer, limit: int = 4000) -> list[str]:
    """Alphabetic vocabulary entries that are exactly one token when preceded by a space."""
    vocab = getattr(tokenizer, "get_vocab", lambda: {})()
    decode = getattr(tokenizer, "decode", None)
    words: list[str] = []
    seen: set[str] = set()
    for token_id in sorted(vocab.values()):
        piece = decode([token_id]) if decode else ""
        word = piece.strip()
        if len(word) < 2 or not word.isascii() or not word.isalpha() or word in seen:
            continue
        seen.add(word)
        if len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1:  # as it appears after a space
            words.append(word)
            if len(words) >= limit:
                break
    return words


class _FastTokenizer:
    """The few methods we need, over a `tokenizers.Tokenizer` read from a model's tokenizer.json.

    Used for local model directories: no `transformers` import (slow, and noisy under Locust's gevent).
    """

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()


def load_tokenizer(name_or_path: str | None) -> Tokenizer | None:
    """The model's tokenizer from a local directory (tokenizer.json) or the local HF cache; None if absent."""
    if not name_or_path:
        return None
    local = Path(name_or_path).expanduser()
    if (local / "tokenizer.json").is_file():
        try:
            return _FastTokenizer(local / "tokenizer.json")
        except Exception as exc:  # noqa: BLE001
            log.warning("could not read %s/tokenizer.json (%s); trying transformers", local, exc)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        log.warning("transformers is not installed; prompt lengths are approximate")
        return None
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.exists() else name_or_path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 — any failure means "no exact counts", never a crash
        log.warning("could not load tokenizer %r (%s); prompt lengths are approximate", name_or_path, exc)
        return None


def discover_model(host: str, timeout: float = 10.0) -> tuple[str, str]:
    """(model id, model root path) from the server's /v1/models; ("", "") when it does not answer."""
    import requests

    try:
        resp = requests.get(host.rstrip("/") + "/v1/models", timeout=timeout)
        resp.raise_for_status()
        first = (resp.json().get("data") or [{}])[0]
        return str(first.get("id", "")), str(first.get("root") or "")
    except Exception as exc:  # noqa: BLE001
        log.warning("could not read %s/v1/models (%s); pass --model", host, exc)
        return "", ""
