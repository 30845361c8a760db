"""Report numbers, files, exit codes, record merging, schedule sharding, prompt lengths."""

import json
import math

import pytest

from ampd_plugin import slo
from ampd_plugin.loadtest import report as rep
from ampd_plugin.loadtest.prompts import TextSynthesizer
from ampd_plugin.loadtest.records import RecordStore, record_from_dict
from ampd_plugin.loadtest.schedule import SessionSchedule, Shard, build_sessions, scale_session
from ampd_plugin.loadtest.session import LoadRecord
from ampd_plugin.workload import Round, Session


def R(sid, k, ttft, itl, error=None, route="", kv=0, start=0.0):
    return LoadRecord(session_id=sid, round_index=k, ttft=ttft, itl=itl, error=error, route=route,
                      kv_bytes=kv, start=start, output_tokens=10, max_gap=itl)


RECORDS = [
    R("a", 0, 0.5, 0.05, route="remote", kv=100, start=1), R("a", 1, 0.4, 0.05, route="local", start=2),
    R("b", 0, 1.5, 0.05, route="remote", kv=200, start=3), R("b", 1, 0.3, 0.20, route="local", start=4),
    R("c", 0, float("nan"), None, error="ConnectionError: x", start=5),
]


def test_report_numbers_come_from_slo():
    r = rep.build_report(RECORDS, ttft_slo=1.0, itl_slo=0.1, slo_target=0.5)
    assert r["summary"] == slo.summarize(RECORDS, 1.0, 0.1)
    assert r["summary"]["slo_attainment"] == pytest.approx(2 / 5)
    assert r["attainment_by_round"] == {"0": pytest.approx(1 / 3), "1": pytest.approx(1 / 2)}
    assert r["session_attainment"] == pytest.approx(1 / 3)
    assert r["per_session"]["a"]["met"] and not r["per_session"]["b"]["met"] and r["per_session"]["c"]["errors"] == 1
    assert r["ttft_only_attainment"] == pytest.approx(3 / 5) and r["itl_only_attainment"] == pytest.approx(3 / 5)
    assert r["ttft_percentiles"]["p50"] == pytest.approx(slo.percentile([0.5, 0.4, 1.5, 0.3], 50))
    assert r["summary"]["local_fraction"] == pytest.approx(0.5) and r["summary"]["kv_bytes_moved"] == 300
    assert r["errors_by_kind"] == {"ConnectionError": 1}


@pytest.mark.parametrize("target,code", [(0.4, 0), (0.41, 1)])
def test_exit_code_follows_target(target, code):
    r = rep.build_report(RECORDS, 1.0, 0.1, target)
    assert r["exit_code"] == code and r["passed"] == (code == 0)


def test_no_rounds_is_not_a_pass():
    r = rep.build_report([], 1.0, 0.1, 0.0)
    assert r["exit_code"] == rep.EXIT_NO_DATA and not r["passed"]


def test_files_round_trip(tmp_path):
    report = rep.build_report(RECORDS, 1.0, 0.1, 0.9, meta={"title": "t"})
    paths = rep.write_report(report, RECORDS, tmp_path)
    loaded = json.loads(paths["json"].read_text())  # strict JSON: NaN written as null
    assert loaded["summary"]["rounds"] == 5 and paths["png"].stat().st_size > 1000
    back = rep.read_records_csv(paths["csv"])
    assert len(back) == 5 and back[4].error == "ConnectionError: x" and math.isnan(back[4].ttft)
    assert back[3].itl == pytest.approx(0.2) and back[0].kv_bytes == 100 and back[2].route == "remote"
    # the report re-derived from the CSV equals the one written
    again = rep.build_report(back, 1.0, 0.1, 0.9, meta={"title": "t"})
    assert json.loads(json.dumps(rep._clean(again))) == loaded
    rep.print_report(report)  # renders without error


def test_records_merge_is_idempotent_per_worker():
    master = RecordStore()
    w0, w1 = RecordStore(), RecordStore()
    for r in RECORDS[:2]:
        w0.add(r)
    for r in RECORDS[2:]:
        w1.add(r)
    master.merge("w0", w0.local_payload())
    master.merge("w1", w1.local_payload())
    master.merge("w0", w0.local_payload())  # sent twice (on stop and on flush): no duplicates
    merged = master.all()
    assert len(merged) == 5 and master.sources == {"w0", "w1"}
    assert [r.start for r in merged] == sorted(r.start for r in merged)
    assert math.isnan(record_from_dict({**RECORDS[0].to_dict(), "ttft": None, "future_field": 1}).ttft)


def test_schedule_shards_are_disjoint_and_complete():
    sessions = [Session(f"s{i}", float(10 - i), [Round(1, 1)]) for i in range(10)]
    shards = [SessionSchedule(sessions, Shard(i, 3)) for i in range(3)]
    taken = []
    for sched in shards:
        while (s := sched.take()) is not None:
            taken.append(s.session_id)
    assert sorted(taken) == sorted(s.session_id for s in sessions)
    sched = SessionSchedule(sessions)
    first = sched.take()
    assert first.arrival_s == 1.0  # arrival order
    assert not sched.finish()
    with pytest.raises(ValueError):
        SessionSchedule(sessions, Shard(3, 3))


def test_scale_session_and_build_sessions():
    s = Session("x", 0.0, [Round(100, 10, 1.0), Round(50, 20, 2.0), Round(70, 5, 0.0)])
    t = scale_session(s, 0.1, 0.5, max_rounds=2)
    assert [(r.input_tokens, r.output_tokens) for r in t.rounds] == [(10, 5), (5, 10)]
    assert t.rounds[-1].tool_delay_s == 0.0 and s.rounds[0].input_tokens == 100
    a = build_sessions("hotpotqa", 4, 2.0, seed=7)
    b = build_sessions("hotpotqa", 4, 2.0, seed=7)
    assert [x.rounds for x in a] == [x.rounds for x in b] and len(a) == 4


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE trained on the spot (the tiny model's tokenizer is built the same way)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog and then some more words appear here"] * 50 + [
        "retrieval results tool output table value index record passage answer question"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))

    class Wrapped:
        def encode(self, text, add_special_tokens=False):
            return tok.encode(text, add_special_tokens=add_special_tokens).ids

        def decode(self, ids):
            return tok.decode(ids)

        def get_vocab(self):
            return tok.get_vocab()

    return Wrapped()


@pytest.mark.parametrize("n", [1, 7, 64, 700, 3000])
def test_synthetic_text_has_exact_token_count(bpe_tokenizer, n):
    synth = TextSynthesizer(bpe_tokenizer, seed=1)
    text = synth.text(n, "s", 0)
    assert len(bpe_tokenizer.encode(text)) == n
    assert synth.text(n, "s", 0) == text  # deterministic
    assert synth.text(n, "s", 1) != text or n == 1  # rounds differ


def test_fallback_without_tokenizer_is_approximate_and_salted():
    synth = TextSynthesizer(None, seed=1)
    text = synth.text(400, "s", 0)
    assert abs(synth.count(text) - 400) <= 2
    assert TextSynthesizer(None, seed=1, salt="run2").text(400, "s", 0) != text
    assert synth.text(0, "s", 0) == ""
