"""zfabric.protocol: framing, schemas and validation at one door (pure, no sockets)."""

from __future__ import annotations

import msgpack
import pytest

from zfabric import protocol
from zfabric.config import PROTOCOL_VERSION
from zfabric.errors import LocalProtocolError, ProtocolError, RemoteProtocolError


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_roundtrip_ops_and_buffers():
    ops = [{"op": "submit", "tasks": [["k", b"payload", [], None]]}, {"op": "heartbeat"}]
    frames = protocol.encode(ops, [b"buf0", memoryview(b"buf1")])
    assert len(frames) == 3
    decoded, buffers = protocol.decode(frames)
    assert decoded == ops
    assert [bytes(b) for b in buffers] == [b"buf0", b"buf1"]


def test_encode_without_buffers_is_one_frame():
    assert len(protocol.encode([{"op": "heartbeat"}])) == 1


def test_every_schema_accepts_a_well_formed_op():
    samples = {(int,): 1, (bytes,): b"x", (str,): "s", (list,): [], (dict,): {},
               (int, float): 1.5, (bytes, type(None)): None}
    for name, schema in protocol.SCHEMAS.items():
        op = {"op": name, **{f: samples[t] for f, t in schema.items()}}
        if name == "coord":
            op["kind"] = "ds-list"
        ops, _ = protocol.decode(protocol.encode([op]))
        assert ops == [op]


def test_extra_fields_are_allowed():
    ops, _ = protocol.decode(protocol.encode([{"op": "heartbeat", "metrics": {"memory": 1}}]))
    assert ops[0]["metrics"] == {"memory": 1}


@pytest.mark.parametrize(
    "frames, message",
    [
        ([], "empty message"),
        ([b"\xc1\xff garbage"], "not msgpack"),
        ([b""], "not msgpack"),
        ([pack({"op": "heartbeat"})], "must be a list of ops"),
        ([pack("heartbeat")], "must be a list of ops"),
        ([pack(42)], "must be a list of ops"),
        ([pack(["heartbeat"])], "an op must be a map"),
        ([pack([{"no": "op"}])], "unknown op None"),
        ([pack([{"op": "frobnicate"}])], "unknown op 'frobnicate'"),
        ([pack([{"op": 7}])], "unknown op 7"),
        ([pack([{"op": "submit"}])], "lacks field 'tasks'"),
        ([pack([{"op": "submit", "tasks": "not a list"}])], "field 'tasks' must be list"),
        ([pack([{"op": "release", "keys": {"a": 1}}])], "field 'keys' must be list"),
        ([pack([{"op": "request", "id": True, "kind": "info", "args": {}}])],
         "field 'id' must be int, got bool"),
        ([pack([{"op": "request", "id": 1.5, "kind": "info", "args": {}}])],
         "field 'id' must be int, got float"),
        ([pack([{"op": "run", "id": 1, "payload": "text, not bytes"}])],
         "field 'payload' must be bytes"),
        ([pack([{"op": "hello", "role": "client", "protocol": "1", "versions": {}, "id": "x"}])],
         "field 'protocol' must be int"),
        ([pack([{"op": "heartbeat"}, {"op": "nope"}])], "unknown op 'nope'"),
    ],
)
def test_malformed_messages_raise_remote_protocol_error(frames, message):
    with pytest.raises(RemoteProtocolError, match=message.replace("(", r"\(")) as info:
        protocol.decode(frames)
    assert isinstance(info.value, ProtocolError)


def test_too_many_frames():
    frames = [pack([{"op": "heartbeat"}]), *([b"x"] * 10)]
    with pytest.raises(RemoteProtocolError, match="11 frames; the limit is 10"):
        protocol.decode(frames, max_frames=10)
    _, buffers = protocol.decode(frames, max_frames=11)
    assert len(buffers) == 10


def test_unencodable_op_is_our_own_fault():
    with pytest.raises(LocalProtocolError, match="cannot encode ops"):
        protocol.encode([{"op": "heartbeat", "bad": object()}])


def test_hello_carries_version_role_and_library_versions():
    op = protocol.hello("worker", "w-1", address="tcp://127.0.0.1:1")
    assert op["op"] == "hello" and op["role"] == "worker" and op["id"] == "w-1"
    assert op["protocol"] == PROTOCOL_VERSION
    assert set(op["versions"]) >= {"python", "cloudpickle", "msgpack", "zfabric"}
    protocol.check(op)


def test_version_mismatches_name_both_sides():
    mine = {"python": "3.12.1", "cloudpickle": "3.0.0", "zfabric": "0.1.0"}
    assert protocol.version_mismatches(mine, {**mine, "python": "3.12.7"}) == []
    diffs = protocol.version_mismatches(mine, {**mine, "python": "3.11.2", "zfabric": "0.2.0"})
    assert diffs == ["python 3.12 here vs 3.11 there", "zfabric 0.1.0 here vs 0.2.0 there"]


def test_heartbeat_interval_is_checked_at_the_door():
    ok = {"op": "heartbeat-interval", "heartbeat_s": 2.5}
    assert protocol.decode(protocol.encode([ok]))[0] == [ok]
    for bad in (0, -1, float("nan"), float("inf"), 10**9, "1", None):
        frames = protocol.encode([{"op": "heartbeat-interval", "heartbeat_s": bad}])
        with pytest.raises(RemoteProtocolError, match="heartbeat_s"):
            protocol.decode(frames)
    with pytest.raises(RemoteProtocolError, match="heartbeat_s"):
        protocol.decode(protocol.encode([{"op": "welcome", "epoch": "e", "address": "a",
                                          "heartbeat_s": -1}]))
