"""zfabric.config: defaults, ZFABRIC_* environment overrides, sizes."""

from __future__ import annotations

import pytest

from zfabric import config
from zfabric.config import DEFAULT, Config, from_env, memory_limit_bytes, parse_bytes


def test_defaults_without_environment():
    assert from_env({}) == Config() == DEFAULT
    assert DEFAULT.HEARTBEAT_INTERVAL_S == 0.5 and DEFAULT.ALLOWED_FAILURES == 3


def test_environment_overrides_with_types():
    cfg = from_env({
        "ZFABRIC_HEARTBEAT_INTERVAL_S": "0.25",
        "ZFABRIC_ALLOWED_FAILURES": "5",
        "ZFABRIC_INLINE_BYTES": "1e3",
        "UNRELATED": "x",
    })
    assert cfg.HEARTBEAT_INTERVAL_S == 0.25
    assert cfg.ALLOWED_FAILURES == 5 and type(cfg.ALLOWED_FAILURES) is int
    assert cfg.INLINE_BYTES == 1000 and type(cfg.INLINE_BYTES) is int


def test_keyword_overrides_win_and_none_is_ignored():
    cfg = from_env({"ZFABRIC_WORKER_TTL_S": "7"}, WORKER_TTL_S=2.0, CLIENT_TTL_S=None)
    assert cfg.WORKER_TTL_S == 2.0 and cfg.CLIENT_TTL_S == DEFAULT.CLIENT_TTL_S


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("ZFABRIC_SCHEDULER_PORT", "9999")
    assert from_env().SCHEDULER_PORT == 9999


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="ZFABRIC_WORKER_TTL_S='soon' is not a valid float"):
        from_env({"ZFABRIC_WORKER_TTL_S": "soon"})


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        DEFAULT.WORKER_TTL_S = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GiB", 2 * 2**30), ("300MB", 300 * 10**6), ("1e9", 10**9), ("512", 512),
        ("1.5 kib", 1536), ("10 k", 10_000), ("4b", 4), (" 3 MiB ", 3 * 2**20),
        (1024, 1024), (2.0e3, 2000),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "2 furlongs", "1.2.3MB", "lots"])
def test_parse_bytes_refuses_nonsense(text):
    with pytest.raises(ValueError, match=r"cannot read .* as a size"):
        parse_bytes(text)


def test_memory_limit():
    assert memory_limit_bytes(None) == 0 == memory_limit_bytes(0)
    assert memory_limit_bytes("1GiB") == 2**30
    auto = memory_limit_bytes("auto", nthreads=1)
    assert auto > 0
    assert memory_limit_bytes(0.5) > 0


def test_protocol_version_is_an_int():
    assert isinstance(config.PROTOCOL_VERSION, int)
