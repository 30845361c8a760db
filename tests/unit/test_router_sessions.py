"""Session identity and incremental prompt counting."""

from ampd_plugin.router.sessions import PromptCounter, SessionStore, session_identity


def test_identity_order_header_then_field_then_user():
    assert session_identity({"x-session-id": "h"}, {"session_id": "f", "user": "u"}) == ("h", True)
    assert session_identity({}, {"session_id": "f", "user": "u"}) == ("f", True)
    assert session_identity({}, {"user": "u"}) == ("u", True)
    assert session_identity({}, {"session_id": 42}) == ("42", True)


def test_anonymous_requests_are_one_round_sessions():
    a, explicit_a = session_identity({}, {})
    b, _ = session_identity({"x-session-id": "  "}, {"session_id": None, "user": True})
    assert not explicit_a and a != b and a.startswith("anon-")
    store = SessionStore(ttl_s=60)
    store.get(a, explicit=False)
    assert len(store) == 0  # never remembered


def test_named_ids_that_are_not_plain_tokens_are_refused_with_the_rule():
    import pytest

    from ampd_plugin.router.errors import RouterError
    from ampd_plugin.router.session_ids import MAX_SESSION_ID_LEN

    assert session_identity({"x-session-id": "x" * MAX_SESSION_ID_LEN}, {})[0] == "x" * MAX_SESSION_ID_LEN
    for headers, body, where in [({"x-session-id": "x" * (MAX_SESSION_ID_LEN + 1)}, {}, "X-Session-ID"),
                                 ({}, {"session_id": "a\nINFO forged line"}, "session_id"),
                                 ({}, {"conversation_id": "tab\there"}, "conversation_id")]:
        with pytest.raises(RouterError) as err:
            session_identity(headers, body)
        assert err.value.status == 400 and where in str(err.value.body())


def test_user_field_that_is_not_a_plain_token_becomes_a_stable_digest():
    a, explicit = session_identity({}, {"user": "Alice Smith <alice@example.com>"})
    b, _ = session_identity({}, {"user": "Alice Smith <alice@example.com>"})
    c, _ = session_identity({}, {"user": "Bob\n"  + "x" * 500})
    assert explicit and a == b and a.startswith("user-") and c.startswith("user-") and a != c
    assert session_identity({}, {"user": "alice@example.com"})[0] == "alice@example.com"


def test_client_strings_in_logs_are_escaped_and_bounded():
    from ampd_plugin.router.session_ids import for_log

    assert for_log("a\nb\tc") == "a\\nb\\tc"
    assert "\n" not in for_log("x\n" * 1000) and len(for_log("y" * 1000)) <= 201


class WordTokenizer:
    """Counts words; records what it was asked to tokenize."""

    chat_template = None

    def __init__(self):
        self.calls = []

    def __call__(self, text, add_special_tokens=False):
        self.calls.append(text)
        return {"input_ids": text.split()}


def test_counting_is_incremental_per_session():
    tok = WordTokenizer()
    counter = PromptCounter(tok)
    store = SessionStore(ttl_s=60)
    s = store.get("s", explicit=True)
    msgs = [{"role": "user", "content": "one two three"}]
    p1 = counter.render({"messages": msgs}, chat=True)
    assert counter.count(p1, s) == len(p1.split())
    msgs2 = msgs + [{"role": "assistant", "content": "four five"}, {"role": "user", "content": "six"}]
    p2 = counter.render({"messages": msgs2}, chat=True)
    n2 = counter.count(p2, s)
    assert n2 == len(p2.split())
    assert tok.calls[-1] == p2[len(p1):]  # only the new suffix was tokenized


def test_rewritten_history_is_counted_in_full():
    tok = WordTokenizer()
    counter = PromptCounter(tok)
    s = SessionStore(ttl_s=60).get("s", explicit=True)
    counter.count("a b c d", s)
    assert counter.count("x y", s) == 2
    assert tok.calls[-1] == "x y"


def test_estimate_without_tokenizer_and_token_id_prompts():
    counter = PromptCounter(None)
    assert counter.count("abcdefgh") == 2
    assert counter.count(counter.render({"prompt": [1, 2, 3]}, chat=False)) == 3
    assert counter.token_ids("text") is None


def test_expiry_skips_busy_sessions():
    store = SessionStore(ttl_s=10)
    a = store.get("a", True)
    b = store.get("b", True)
    b.busy = True
    gone = store.expire(now=a.last_seen + 11)
    assert [s.session_id for s in gone] == ["a"] and len(store) == 1
