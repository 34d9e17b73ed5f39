"""Known models fetched from the package index in parts: assembled in order, verified, never half-written."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from shardwise import fetch
from shardwise.errors import ShardwiseError


def _fake_model(tmp_path, monkeypatch, parts: list[bytes], sha: str | None = None):
    """Wheels ``fake-part{n}`` already in the cache's wheel folder (so pip is not called)."""
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    for n, data in enumerate(parts, 1):
        with zipfile.ZipFile(wheels / f"fake_part{n}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_part{n}/data/part{n:02d}.bin", data)
    whole = b"".join(parts)
    model = fetch.KnownModel("fake-part", "1.0", len(parts), "{module}/data/part{n:02d}.bin", len(whole),
                             sha or hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(fetch.KNOWN, "fake", model)
    return whole


def test_parts_are_assembled_in_order(tmp_path, monkeypatch):
    whole = _fake_model(tmp_path, monkeypatch, [b"GGUF" + bytes(range(200)), b"second", b"third part"])
    path = fetch.assemble("fake")
    assert path.read_bytes() == whole
    assert fetch.assemble("fake") == path  # cached


def test_a_corrupt_assembly_is_refused_and_removed(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch, [b"one", b"two"], sha="0" * 64)
    with pytest.raises(ShardwiseError, match="parts corrupt or changed"):
        fetch.assemble("fake")
    gguf_dir = tmp_path / "cache" / "gguf"
    assert not any(gguf_dir.iterdir())  # neither the file nor a temporary left to be accepted later


def test_a_wheel_without_its_part_is_refused(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch, [b"one", b"two"])
    bad = tmp_path / "cache" / "wheels" / "fake_part2-1.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("something/else.bin", b"x")
    with pytest.raises(ShardwiseError, match="does not hold"):
        fetch.assemble("fake")
    assert not bad.exists()  # fetched again next time
    assert not any((tmp_path / "cache" / "gguf").iterdir())


def test_unknown_model_names_the_known_ones(capsys):
    from shardwise.cli import main

    assert main(["convert", "--fetch", "llama-9000"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'llama-9000'" in err and "qwen2.5-coder-1.5b-instruct" in err
