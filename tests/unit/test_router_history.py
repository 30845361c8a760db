"""The history a round may reuse is the longest common prefix of what the decode worker holds and the prompt."""

import json
import logging

from router_fakes import RouterHarness, run

from ampd_plugin.router.history import common_prefix_len, reusable_tokens
from ampd_plugin.router.sessions import PromptCounter, Session


def test_common_prefix_len():
    assert common_prefix_len("", "abc") == 0
    assert common_prefix_len("abc", "abc") == 3
    assert common_prefix_len("abcdef", "abcxef") == 3
    assert common_prefix_len("abc", "abcdef") == 3
    assert common_prefix_len("x" * 100_000 + "a", "x" * 100_000 + "b") == 100_000


def session(last_text: str, output: str) -> Session:
    counter = PromptCounter(None)
    s = Session("s", True)
    counter.remember(s, last_text, counter.count_text(last_text))
    s.last_output = output
    return s


def test_a_prompt_that_extends_what_is_held_is_not_limited():
    c = PromptCounter(None)
    s = session("user: " + "a" * 400 + "\n", " the answer")
    assert reusable_tokens(s, s.last_text + " the answer" + "user: more\n", c) is None
    assert reusable_tokens(s, [1, 2, 3], c) is None  # token ids: nothing to compare with


def test_a_re_rendered_history_is_reused_up_to_where_it_differs():
    c = PromptCounter(None)
    last = "user: " + "a" * 400 + "\nassistant: <think>" + "r" * 200 + "</think>ok\nuser: next\n"
    s = session(last, " generated text")
    # the template dropped the earlier reasoning: the prompts agree up to the <think>
    new = "user: " + "a" * 400 + "\nassistant: ok\nuser: next\n" + " generated text" + "user: third\n"
    cut = len("user: " + "a" * 400 + "\nassistant: ")
    assert reusable_tokens(s, new, c) == c.count_text(new[:cut]) - 1
    # the prompt keeps the last prompt but not the generated text (the client edited the answer)
    edited = last + " generated TEXT" + "user: third\n"
    assert reusable_tokens(s, edited, c) == s.last_text_tokens + c.count_text(" generated ") - 1
    assert reusable_tokens(s, "system: something else entirely", c) == 0


def test_the_router_claims_only_the_common_prefix(caplog):
    caplog.set_level(logging.INFO, logger="ampd.router.decisions")
    opening = [{"role": "user", "content": "y" * 800}]

    async def main():
        async with RouterHarness(policy="disagg") as h:
            _, out, _ = await h.chat(opening, session="s")
            answer = out["choices"][0]["message"]
            s = h.router.sessions.get("s", True)
            held, kept = s.resident_tokens, s.last_output == answer["content"]
            # the client sends the answer back changed (a template re-rendering it would do the same)
            msgs = opening + [{"role": "assistant", "content": "<think>why</think>" + answer["content"]},
                              {"role": "user", "content": "go on"}]
            await h.chat(msgs, session="s")
            return held, kept

    held, kept = run(main())
    logs = [json.loads(r.getMessage()) for r in caplog.records if r.name == "ampd.router.decisions"]
    first, second = logs
    assert kept  # the generated text was kept for the comparison
    # D holds round 1's prompt and its answer; round 2 shares only the prompt (up to the assistant header)
    assert first["l_hist"] == 0 and 0 < second["l_hist"] < first["l_incr"] < held
