"""Multi-round workloads: sessions of rounds, synthetic profiles from the AMPD paper, JSONL trace files.

One workload feeds the simulator, the planner and the load test, so all three replay the same sessions.

Token convention. `Round.input_tokens` is the number of NEW tokens a round appends to the conversation
(the user message, tool result or retrieved passages), not the whole prompt. The prompt of round k is
therefore `Session.history_tokens(k) + rounds[k].input_tokens`, where the history is every earlier
round's input and output. This matches the AMPD paper's "prefill length" (per round) and AIPerf's
multi-turn traces. Mooncake traces instead carry the whole prompt per request: read them with
`input_mode="cumulative"` (CLI `--input-mode cumulative`), which turns each line's `input_length` into
the new tokens by subtracting the previous round's prompt and output.

Trace file (JSONL, one request = one round per line, Mooncake/AIPerf compatible):

    {"session_id": "toolbench-0", "timestamp": 0.0, "input_length": 1203, "output_length": 41}
    {"session_id": "toolbench-0", "delay": 812.5, "input_length": 388, "output_length": 57}

- `timestamp` (ms): when a session's first round is sent, from the start of the trace.
- `delay` (ms): for later rounds, the tool/retrieval/think time between the previous round's last token
  and this round's request. A later round with only a `timestamp` gets the gap between the two send
  timestamps (an over-estimate: it includes the previous round's service time); with neither, it follows
  the previous answer at once (AIPerf's default). A first round with only `delay` starts that many ms
  after the trace start; with neither, the session is *untimed* (AIPerf multi-turn files without a
  schedule) and `load_workload` requires a `rate` to give it Poisson arrivals.
- `session_id` optional: lines without one are single-round sessions (plain Mooncake traces).
- `hash_ids` optional: kept and written back unchanged. Unknown fields are ignored.
Lines of one session appear in round order. A bad line raises `TraceError` naming the line number.

`read_trace` also reads AIPerf `multi_turn` files (one conversation per line with `turns`) and
Qwen-Bailian-style rows (`chat_id`, `parent_chat_id`, `turn`, whole-prompt `input_length`, `timestamp` in
seconds), recognised by their first record's keys (`parse_aiperf_multi_turn`, `parse_bailian`).

Synthetic profiles (the paper's four with means from the AMPD paper, Table 1, plus `coding-agent`, sourced in
`PROFILES`; the spread is our choice, documented in
`PROFILES`): per-round new input and output tokens are lognormal around the paper's means; ToolBench and
GAIA round counts are geometric (an agent stops after each round with a fixed probability) with the
paper's mean, HotpotQA and DuReader have exactly 3 rounds (3 retrieval calls); tool delays are lognormal;
sessions arrive as a Poisson process (the first at t = 0). Everything is drawn from one seeded
`numpy.random.Generator`, so the same seed gives the same workload.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np

InputMode = Literal["incremental", "cumulative"]
INPUT_MODES: tuple[str, ...] = ("incremental", "cumulative")


class TraceError(ValueError):
    """A trace file line that cannot be used; the message names the file, line and problem."""


@dataclass(frozen=True)
class Round:
    """One request of a session: new input tokens, output tokens, and the tool delay that follows it."""

    input_tokens: int  # new tokens this round appends (not the whole prompt)
    output_tokens: int
    tool_delay_s: float = 0.0  # after this round's last token, before the next round is sent
    hash_ids: tuple[int, ...] | None = None  # Mooncake prefix-block hashes, kept for round trips


@dataclass
class Session:
    session_id: str
    arrival_s: float  # when the first round is sent
    rounds: list[Round] = field(default_factory=list)
    timed: bool = True  # False: the trace gave no arrival time (arrival_s is 0 until re-timed)

    def history_tokens(self, k: int) -> int:
        """Tokens of context before round k's new input: all earlier inputs and outputs (l_hist)."""
        return sum(r.input_tokens + r.output_tokens for r in self.rounds[:k])

    def prompt_tokens(self, k: int) -> int:
        """The whole prompt of round k."""
        return self.history_tokens(k) + self.rounds[k].input_tokens

    @property
    def total_tokens(self) -> int:
        """Final context length (what the decode worker holds after the last round)."""
        return self.history_tokens(len(self.rounds))


# ----------------------------------------------------------------------------------------------
# Synthetic profiles
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """A synthetic workload. Means are per round; `first_round_factor` makes round 0 longer (system
    prompt, tool documentation, question + first passages) while keeping the per-round mean."""

    name: str
    mean_rounds: float
    fixed_rounds: bool  # True: exactly mean_rounds rounds; False: geometric with that mean
    mean_input: float
    mean_output: float
    mean_tool_delay_s: float
    input_sigma: float = 0.7  # lognormal shape of per-round new input
    output_sigma: float = 0.6
    tool_delay_sigma: float = 0.6
    first_round_factor: float = 1.0
    max_rounds: int = 64
    description: str = ""
    rounds_sigma: float = 0.0  # > 0: round counts lognormal around mean_rounds (agent step counts), not geometric


PROFILES: dict[str, Profile] = {
    "toolbench": Profile(
        "toolbench", 3.96, False, 703.79, 50.39, 1.0, first_round_factor=2.0, max_rounds=40,
        description="ToolBench agent: long first prompt (tool docs), short tool results, short calls; "
                    "RapidAPI-style tool latency ~1 s"),
    "gaia": Profile(
        "gaia", 11.32, False, 6161.02, 528.76, 3.0, first_round_factor=1.5, max_rounds=96,
        description="GAIA agent: long web/file observations, long reasoning; browsing/code tools ~3 s"),
    "hotpotqa": Profile(
        "hotpotqa", 3, True, 1569.8, 80.03, 0.3,
        description="HotpotQA iterative RAG: 3 retrieval rounds, passages appended; retrieval ~0.3 s"),
    "dureader": Profile(
        "dureader", 3, True, 3081.23, 150.10, 0.5,
        description="DuReader iterative RAG: 3 retrieval rounds, longer passages; retrieval ~0.5 s"),
    # Not from the AMPD paper. A SWE-agent-style coding agent: a long first prompt (system prompt, tool
    # documentation, the issue), then ~20 think-act-observe steps whose observations (file views, test
    # output) are appended to a history that grows to tens of thousands of tokens. Sources: SWE-agent
    # (Yang et al. 2024, arXiv 2405.15793: a 100-line file window per view, trajectories of tens of steps);
    # SWE-Bench Pro trajectory analysis of 2,920 runs (nilenso, 2025: median 29–78 steps per task by model);
    # Raju et al. 2026 (arXiv 2602.16069: successful mini-SWE-agent trajectories mostly stay under 20k
    # tokens, failing ones grow longer). The means and spreads below are our choice inside those ranges,
    # not a fit to one trace; tool delays are heavy-tailed (sigma 1.2): most commands return in well under a
    # second, test runs and builds take tens of seconds.
    "coding-agent": Profile(
        "coding-agent", 20, False, 1200.0, 180.0, 3.0, input_sigma=0.8, tool_delay_sigma=1.2,
        first_round_factor=5.0, max_rounds=60, rounds_sigma=0.5,
        description="coding agent (SWE-agent style): ~20 steps, 5k-token first prompt, file views and test "
                    "output appended (history ~30k tokens), bursty tool delays ~3 s"),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown workload profile {name!r}; known profiles: {', '.join(PROFILES)}") from None


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    """Lognormal samples with the given arithmetic mean."""
    return rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma, size)


def _tokens(values: np.ndarray) -> list[int]:
    return [max(1, int(v)) for v in np.rint(values)]


def _round_counts(rng: np.random.Generator, profile: Profile, n: int) -> np.ndarray:
    if profile.fixed_rounds:
        return np.full(n, int(round(profile.mean_rounds)))
    if profile.rounds_sigma > 0:
        counts = np.rint(_lognormal(rng, profile.mean_rounds, profile.rounds_sigma, n)).astype(int)
        return np.clip(counts, 1, profile.max_rounds)
    return np.minimum(rng.geometric(1.0 / profile.mean_rounds, n), profile.max_rounds)


def poisson_arrivals(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Arrival times (s) of a Poisson process at `rate` sessions/s, the first at 0."""
    _check_positive(sessions=n, rate=rate)
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def generate(profile: str | Profile, sessions: int, rate: float, seed: int = 0) -> list[Session]:
    """`sessions` synthetic sessions of `profile` arriving as a Poisson process at `rate` sessions/s."""
    prof = get_profile(profile) if isinstance(profile, str) else profile
    _check_positive(sessions=sessions, rate=rate)
    rng = np.random.default_rng(seed)
    arrivals = poisson_arrivals(rng, sessions, rate)
    counts = _round_counts(rng, prof, sessions)
    total = int(counts.sum())
    # Later-round mean chosen so the mean over all rounds stays the paper's mean.
    later_mean = prof.mean_input * counts.mean() / (prof.first_round_factor + counts.mean() - 1)
    inputs = _tokens(_lognormal(rng, later_mean, prof.input_sigma, total))
    firsts = _tokens(_lognormal(rng, later_mean * prof.first_round_factor, prof.input_sigma, sessions))
    outputs = _tokens(_lognormal(rng, prof.mean_output, prof.output_sigma, total))
    delays = _lognormal(rng, prof.mean_tool_delay_s, prof.tool_delay_sigma, total)
    out: list[Session] = []
    pos = 0
    for i in range(sessions):
        rounds = []
        n = int(counts[i])
        for k in range(n):
            rounds.append(Round(
                input_tokens=firsts[i] if k == 0 else inputs[pos + k],
                output_tokens=outputs[pos + k],
                tool_delay_s=round(float(delays[pos + k]), 6) if k < n - 1 else 0.0,
            ))
        pos += n
        out.append(Session(f"{prof.name}-{i}", round(float(arrivals[i]), 6), rounds))
    return out


def retime(sessions: Sequence[Session], rate: float, seed: int = 0) -> list[Session]:
    """The same sessions with fresh Poisson arrivals at `rate` (to sweep load over one trace)."""
    arrivals = poisson_arrivals(np.random.default_rng(seed), len(sessions), rate)
    return [Session(s.session_id, round(float(t), 6), list(s.rounds)) for s, t in zip(sessions, arrivals)]


# ----------------------------------------------------------------------------------------------
# Trace files
# ----------------------------------------------------------------------------------------------


def trace_records(sessions: Iterable[Session]) -> Iterator[dict[str, Any]]:
    """The JSONL records of `sessions`: first rounds carry `timestamp`, later rounds `delay` (ms)."""
    for s in sessions:
        for k, r in enumerate(s.rounds):
            rec: dict[str, Any] = {"session_id": s.session_id}
            if k == 0:
                if s.timed:
                    rec["timestamp"] = round(s.arrival_s * 1000.0, 3)
            else:
                rec["delay"] = round(s.rounds[k - 1].tool_delay_s * 1000.0, 3)
            rec["input_length"] = r.input_tokens
            rec["output_length"] = r.output_tokens
            if r.hash_ids is not None:
                rec["hash_ids"] = list(r.hash_ids)
            yield rec


def write_trace(sessions: Iterable[Session], path: str | Path) -> int:
    """Write sessions as JSONL (incremental `input_length`), ordered by arrival; returns lines written."""
    ordered = sorted(sessions, key=lambda s: s.arrival_s)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for rec in trace_records(ordered):
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
            n += 1
    return n


def _field_int(rec: dict, key: str, where: str, minimum: int) -> int:
    value = rec.get(key)
    if value is None:
        raise TraceError(f"{where}: missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise TraceError(f"{where}: {key!r} must be an integer, got {value!r}")
    if value < minimum:
        raise TraceError(f"{where}: {key!r} must be >= {minimum}, got {value!r}")
    return int(value)


def _field_ms(rec: dict, key: str, where: str) -> float | None:
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TraceError(f"{where}: {key!r} must be a number of milliseconds, got {value!r}")
    if value < 0:
        raise TraceError(f"{where}: {key!r} must be >= 0, got {value!r}")
    return float(value)


@dataclass
class _Building:
    session: Session
    last_timestamp_ms: float
    last_prompt: int  # whole prompt length of the previous round (for cumulative mode)


def parse_trace(lines: Iterable[str], input_mode: InputMode = "incremental", source: str = "trace") -> list[Session]:
    """Parse JSONL trace lines into sessions (sorted by arrival). See the module docstring for fields."""
    if input_mode not in INPUT_MODES:
        raise ValueError(f"unknown input mode {input_mode!r}; expected one of {', '.join(INPUT_MODES)}")
    building: dict[str, _Building] = {}
    for lineno, where, rec in _json_lines(lines, source):
        sid = rec.get("session_id")
        sid = f"line-{lineno}" if sid is None else str(sid)
        raw_input = _field_int(rec, "input_length", where, 1)
        output = _field_int(rec, "output_length", where, 1)
        timestamp = _field_ms(rec, "timestamp", where)
        delay = _field_ms(rec, "delay", where)
        hash_ids = rec.get("hash_ids")
        if hash_ids is not None:
            if not isinstance(hash_ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in hash_ids):
                raise TraceError(f"{where}: 'hash_ids' must be a list of integers")
            hash_ids = tuple(hash_ids)
        current = building.get(sid)
        if current is None:
            timed = timestamp is not None or delay is not None
            start_ms = timestamp if timestamp is not None else (delay if delay is not None else 0.0)
            session = Session(sid, start_ms / 1000.0, [], timed=timed)
            current = building[sid] = _Building(session, start_ms, 0)
            new_input = raw_input
        else:
            session = current.session
            if delay is not None:
                gap_ms = delay
            elif timestamp is not None:
                if timestamp < current.last_timestamp_ms:
                    raise TraceError(f"{where}: timestamp {timestamp} is earlier than the previous round of "
                                     f"session {sid!r} ({current.last_timestamp_ms})")
                gap_ms = timestamp - current.last_timestamp_ms
            else:
                gap_ms = 0.0  # no schedule: the next round follows the answer at once
            previous = session.rounds[-1]
            session.rounds[-1] = Round(previous.input_tokens, previous.output_tokens, gap_ms / 1000.0,
                                       previous.hash_ids)
            new_input = raw_input
            if input_mode == "cumulative":
                new_input = raw_input - current.last_prompt - previous.output_tokens
                if new_input < 1:
                    raise TraceError(
                        f"{where}: cumulative input_length {raw_input} does not exceed the previous prompt plus "
                        f"output ({current.last_prompt} + {previous.output_tokens}) of session {sid!r}; "
                        f"is this trace incremental (--input-mode incremental)?")
            current.last_timestamp_ms = timestamp if timestamp is not None else current.last_timestamp_ms + gap_ms
        current.last_prompt = raw_input if input_mode == "cumulative" else 0
        session.rounds.append(Round(new_input, output, 0.0, hash_ids))
    sessions = [b.session for b in building.values()]
    sessions.sort(key=lambda s: s.arrival_s)  # stable: ties keep file order
    return sessions


def read_trace(path: str | Path, input_mode: InputMode | None = None) -> list[Session]:
    """Read a JSONL trace file in any of TRACE_FORMATS (told apart by the first record's keys);
    raises TraceError (bad line) or ValueError (unreadable/empty file). `input_mode` defaults to each
    format's convention (Mooncake/AIPerf incremental, Bailian cumulative)."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()
        fmt = sniff_format(next((line for line in lines if line.strip()), "{}"))
        if fmt == "aiperf-multi-turn":
            sessions = parse_aiperf_multi_turn(lines, source=str(path))
        elif fmt == "bailian":
            sessions = parse_bailian(lines, source=str(path), input_mode=input_mode or "cumulative")
        else:
            sessions = parse_trace(lines, input_mode=input_mode or "incremental", source=str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read trace {path}: {exc}") from None
    if not sessions:
        raise TraceError(f"{path}: the trace has no requests")
    return sessions


# ----------------------------------------------------------------------------------------------
# Other multi-turn trace formats
# ----------------------------------------------------------------------------------------------

WORDS_PER_TOKEN = 0.75  # the load test's fallback rule when a turn gives text but no token count


def _json_lines(lines: Iterable[str], source: str) -> Iterator[tuple[int, str, dict]]:
    """Each non-blank line as (line number, "source: line N", object); a bad line names itself."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}: line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(rec, dict):
            raise TraceError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        yield lineno, where, rec


def _turn_tokens(turn: dict, where: str) -> int:
    """A turn's input tokens: `input_length` if given, else its `text`/`texts` at WORDS_PER_TOKEN."""
    if turn.get("input_length") is not None:
        return _field_int(turn, "input_length", where, 1)
    texts = turn.get("texts", turn.get("text"))
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise TraceError(f"{where}: a turn needs 'input_length', or 'text'/'texts' with its content")
    return max(1, math.ceil(sum(len(t.split()) for t in texts) / WORDS_PER_TOKEN))


def parse_aiperf_multi_turn(lines: Iterable[str], source: str = "trace", default_output: int = 128) -> list[Session]:
    """AIPerf `multi_turn` files: one conversation per line, `{"session_id", "turns": [...]}`.

    A turn has `text`/`texts` or `input_length`, optional `output_length` (else `default_output`: AIPerf
    lets the server decide), `delay` (ms after the previous turn) or `timestamp` (ms since the start). A
    leading `role: system` turn is prepended to the first turn, as AIPerf hoists it.
    """
    out: list[Session] = []
    for _, where, rec in _json_lines(lines, source):
        turns = rec.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            raise TraceError(f"{where}: 'turns' must be a non-empty list of objects")
        system = 0
        if turns[0].get("role") == "system" and len(turns) > 1:
            system, turns = _turn_tokens(turns[0], f"{where}, turn 1"), turns[1:]
        sid = str(rec.get("session_id", f"line-{where.rsplit(' ', 1)[1]}"))
        rounds: list[Round] = []
        arrival, timed, last_ts = 0.0, False, None
        for k, turn in enumerate(turns):
            at = f"{where}, turn {k + 1 + bool(system)}"
            tokens = _turn_tokens(turn, at) + (system if k == 0 else 0)
            output = _field_int(turn, "output_length", at, 1) if turn.get("output_length") is not None else default_output
            delay, ts = _field_ms(turn, "delay", at), _field_ms(turn, "timestamp", at)
            if k == 0:
                timed = ts is not None or delay is not None
                arrival = (ts if ts is not None else delay or 0.0) / 1000.0
            else:
                if ts is not None and last_ts is not None and ts < last_ts:
                    raise TraceError(f"{at}: timestamp {ts} is earlier than the previous turn's ({last_ts})")
                gap = delay if delay is not None else (ts - last_ts if ts is not None and last_ts is not None else 0.0)
                prev = rounds[-1]
                rounds[-1] = Round(prev.input_tokens, prev.output_tokens, gap / 1000.0)
            last_ts = ts if ts is not None else last_ts
            rounds.append(Round(tokens, output))
        out.append(Session(sid, arrival, rounds, timed=timed))
    out.sort(key=lambda s: s.arrival_s)
    return out


def parse_bailian(lines: Iterable[str], source: str = "trace", input_mode: InputMode = "cumulative") -> list[Session]:
    """Qwen-Bailian-style rows: `chat_id`, `parent_chat_id` (-1 or absent for a conversation's first
    request), `timestamp` (s), `input_length`, `output_length`, optional `turn`, `hash_ids`.

    A conversation is the chain of requests linked by `parent_chat_id`. `input_length` is the whole prompt
    (the history included) unless `input_mode="incremental"`; the tool delay before a request is the gap
    between the two send times (an over-estimate, like timestamp-only Mooncake rounds). A `turn` that does
    not follow its parent's by one is an error.
    """
    if input_mode not in INPUT_MODES:
        raise ValueError(f"unknown input mode {input_mode!r}; expected one of {', '.join(INPUT_MODES)}")
    chains: dict[int, list] = {}  # root chat id -> [session, last timestamp s, last prompt, last turn, last chat]
    root_of: dict[int, int] = {}
    for _, where, rec in _json_lines(lines, source):
        chat = _field_int(rec, "chat_id", where, 0)
        parent = rec.get("parent_chat_id", -1)
        if isinstance(parent, bool) or not isinstance(parent, int):
            raise TraceError(f"{where}: 'parent_chat_id' must be an integer (-1 for a first request), got {parent!r}")
        ts = rec.get("timestamp")
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
            raise TraceError(f"{where}: 'timestamp' must be a number of seconds >= 0, got {ts!r}")
        ts = float(ts)
        raw = _field_int(rec, "input_length", where, 1)
        output = _field_int(rec, "output_length", where, 1)
        turn = _field_int(rec, "turn", where, 1) if rec.get("turn") is not None else None
        if chat in root_of:
            raise TraceError(f"{where}: chat_id {chat} appears twice")
        if parent < 0:
            if turn not in (None, 1):
                raise TraceError(f"{where}: chat {chat} has no parent but turn {turn}")
            root_of[chat] = chat
            chains[chat] = [Session(f"chat-{chat}", ts, [Round(raw, output)]), ts, raw, 1, chat]
            continue
        if parent not in root_of:
            raise TraceError(f"{where}: parent_chat_id {parent} of chat {chat} was not seen before it")
        root = root_of[parent]
        session, last_ts, last_prompt, last_turn, last_chat = chains[root]
        if parent != last_chat:
            raise TraceError(f"{where}: chat {chat} continues chat {parent}, which already has a continuation "
                             f"(chat {last_chat}): branching conversations are not supported")
        if turn is not None and turn != last_turn + 1:
            raise TraceError(f"{where}: chat {chat} has turn {turn}, its parent turn {last_turn}")
        if ts < last_ts:
            raise TraceError(f"{where}: timestamp {ts} is earlier than its parent's ({last_ts})")
        prev = session.rounds[-1]
        new = raw - last_prompt - prev.output_tokens if input_mode == "cumulative" else raw
        if new < 1:
            raise TraceError(f"{where}: input_length {raw} does not exceed the parent's prompt plus output "
                             f"({last_prompt} + {prev.output_tokens}); is this trace incremental?")
        session.rounds[-1] = Round(prev.input_tokens, prev.output_tokens, ts - last_ts)
        session.rounds.append(Round(new, output))
        root_of[chat] = root
        chains[root] = [session, ts, raw if input_mode == "cumulative" else 0, last_turn + 1, chat]
    sessions = [c[0] for c in chains.values()]
    start = min((s.arrival_s for s in sessions), default=0.0)
    for s in sessions:  # arrivals from the trace's first request
        s.arrival_s = round(s.arrival_s - start, 6)
    sessions.sort(key=lambda s: s.arrival_s)
    return sessions


TRACE_FORMATS = ("mooncake", "aiperf-multi-turn", "bailian")


def sniff_format(first_line: str) -> str:
    """Which reader a JSONL file needs, from its first record's keys."""
    try:
        rec = json.loads(first_line)
    except json.JSONDecodeError:
        return "mooncake"  # its reader reports the bad line
    if isinstance(rec, dict) and "turns" in rec:
        return "aiperf-multi-turn"
    if isinstance(rec, dict) and "chat_id" in rec:
        return "bailian"
    return "mooncake"


# ----------------------------------------------------------------------------------------------
# One entry point
# ----------------------------------------------------------------------------------------------


def load_workload(name_or_path: str | Path, sessions: int | None = None, rate: float | None = None,
                  seed: int = 0, input_mode: InputMode | None = None) -> list[Session]:
    """A profile name (needs `sessions` and `rate`) or a trace path.

    For a trace, `sessions` keeps the first N sessions by arrival and `rate` replaces the trace's
    arrival times with Poisson arrivals at that rate (tool delays are kept).
    """
    name = str(name_or_path)
    if name.lower() in PROFILES:
        if sessions is None or rate is None:
            raise ValueError(f"workload profile {name!r} needs a session count and a rate")
        return generate(name, sessions, rate, seed)
    path = Path(name_or_path)
    if not path.exists():
        raise ValueError(f"unknown workload {name!r}: not a profile ({', '.join(PROFILES)}) and no such trace file")
    out = read_trace(path, input_mode=input_mode)
    untimed = sum(not s.timed for s in out)
    if untimed and rate is None:
        raise ValueError(f"{path}: {untimed} session(s) have no 'timestamp' or 'delay' on their first round; "
                         f"give a session rate to replay them with Poisson arrivals")
    if sessions is not None:
        _check_positive(sessions=sessions)
        out = out[:sessions]
    if rate is not None:
        out = retime(out, rate, seed)
    return out


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def _describe(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def workload_stats(sessions: Sequence[Session]) -> dict[str, Any]:
    """Summary used by `ampd-plugin workload stats` (and handy in benchmarks)."""
    if not sessions:
        raise ValueError("no sessions")
    rounds = [r for s in sessions for r in s.rounds]
    delays = [s.rounds[k].tool_delay_s for s in sessions for k in range(len(s.rounds) - 1)]
    first = min(s.arrival_s for s in sessions)
    last = max(s.arrival_s for s in sessions)
    duration = last - first
    return {
        "sessions": len(sessions),
        "rounds": len(rounds),
        "rounds_per_session": _describe([len(s.rounds) for s in sessions]),
        "input_tokens": _describe([r.input_tokens for r in rounds]),
        "output_tokens": _describe([r.output_tokens for r in rounds]),
        "final_context_tokens": _describe([s.total_tokens for s in sessions]),
        "tool_delay_s": _describe(delays) if delays else None,
        "arrival_span_s": duration,
        "untimed_sessions": sum(not s.timed for s in sessions),
        "session_rate": (len(sessions) - 1) / duration if duration > 0 else None,
    }
