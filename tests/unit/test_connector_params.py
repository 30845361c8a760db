"""The kv_transfer_params schema: builders round-trip through parse, bad input raises a clear ParamsError."""

import pytest

from ampd_plugin.connector import params as P


def _source(**over):
    d = dict(engine="e1", te="127.0.0.1:15000", notify="tcp://127.0.0.1:16000", xfer="xfer-1",
             blocks=[3, 4, 5], tokens=300, block_size=128, block_bytes=4096, bases=[1 << 20, 2 << 20])
    d.update(over)
    return d


def test_worker_address_parse_and_format():
    assert P.WorkerAddress.parse("127.0.0.1:8010").format() == "http://127.0.0.1:8010"
    assert P.format_worker_address("http://localhost:9/") == "http://localhost:9"
    for bad in ["", "http://127.0.0.1", "ftp://h:1", "http://h:1/v1", "http://h:x"]:
        with pytest.raises(P.ParamsError):
            P.parse_worker_address(bad)


def test_plain_requests_parse_to_none():
    assert P.parse(None) is None
    assert P.parse({"do_remote_prefill": True}) is None


def test_remote_prefill_roundtrip_with_history():
    wire = P.remote_prefill_params("x1", history_from="127.0.0.1:8020", history_tokens=700, session="s")
    p = P.parse(wire)
    assert p.role == "prefill" and p.xfer == "x1" and p.session == "s"
    assert p.history.source.port == 8020 and p.history.tokens == 700
    assert not p.wants_retention


def test_decode_params_take_the_prefill_response():
    resp = P.response_params(source=P.SourceDescriptor.from_dict(_source()), stats={"read_bytes": 1})
    p = P.parse(P.decode_params(resp, session="s"))
    assert p.role == "decode" and p.source.blocks == (3, 4, 5) and p.xfer == "xfer-1"
    assert p.wants_retention
    assert P.response_stats(resp) == {"read_bytes": 1}
    with pytest.raises(P.ParamsError, match="boom"):
        P.decode_params(P.response_params(error="boom"))


def test_local_and_migrate_and_export():
    assert P.parse(P.local_params(session="s", retain=False)).wants_retention is False
    assert P.parse(P.local_params()).wants_retention is False
    m = P.parse(P.migrate_params(history_from="http://127.0.0.1:1", history_tokens=5))
    assert m.role == "decode" and m.history.tokens == 5 and m.xfer.startswith("xfer-")
    assert P.parse(P.export_params("x")).role == "export"


@pytest.mark.parametrize("bad, match", [
    ("nope", "must be an object"),
    ({"ampd": []}, "must be an object"),
    ({"ampd": {"role": "boss"}}, "role"),
    ({"ampd": {"role": "prefill"}}, "xfer"),
    ({"ampd": {"role": "decode"}}, "source"),
    ({"ampd": {"role": "local", "typo": 1}}, "unknown"),
    ({"ampd": {"role": "local", "v": 9}}, "version"),
    ({"ampd": {"role": "local", "retain": "yes"}}, "retain"),
    ({"ampd": {"role": "prefill", "xfer": "x", "history": {"from": "h:1"}}}, "history"),
    ({"ampd": {"role": "decode", "source": _source(tokens=10_000)}}, "exceeds"),
    ({"ampd": {"role": "decode", "source": _source(te="nohost")}}, "host:port"),
    ({"ampd": {"role": "decode", "source": _source(blocks=[-1])}}, "non-negative"),
    ({"ampd": {"role": "decode", "source": {"te": "h:1"}}}, "lacks"),
])
def test_malformed_params_raise_clear_errors(bad, match):
    with pytest.raises(P.ParamsError, match=match):
        P.parse(bad)


def test_fingerprint_is_optional_and_roundtrips():
    fp = P.prompt_fingerprint([1, 2, 3])
    assert fp == P.prompt_fingerprint([1, 2, 3]) != P.prompt_fingerprint([1, 2, 4])
    with_fp = P.SourceDescriptor.from_dict(_source(fingerprint=fp))
    assert with_fp.fingerprint == fp and P.SourceDescriptor.from_dict(with_fp.to_dict()) == with_fp
    assert "fingerprint" not in P.SourceDescriptor.from_dict(_source()).to_dict()
    with pytest.raises(P.ParamsError, match="fingerprint"):
        P.SourceDescriptor.from_dict(_source(fingerprint=7))
