"""The on-disk kernel cache: round trips, atomic writes under several processes, bad or forged
entries rebuilt without exceptions, a private folder, relocation by environment, shape buckets,
and `einsum-ir cache`."""
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading

import pytest

from einsum_ir.codegen import cache

SPEC = "dims B H P M E F\n...\n"  # stands in for str(cascade): keys only hash text


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EINSUM_IR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EINSUM_IR_CACHE", raising=False)
    return tmp_path / "cache"


def counting(value):
    """A build function that returns `value` and counts its calls."""
    def build():
        build.calls += 1
        return value
    build.calls = 0
    return build


# ------------------------------------------------------------------------------- round trips

def test_round_trip_text_and_json(cache_home):
    k = cache.key(SPEC, "h100", "bf16")
    assert cache.load("source", k) is None
    source = "@triton.jit\ndef kernel(Q, K, V):  # ünïcode\n    pass\n"
    choice = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "split_kv": None}
    cache.store("source", k, source)
    cache.store("choice", k, choice)
    assert cache.load("source", k) == source
    assert cache.load("choice", k) == choice
    assert (cache_home / "source" / f"{k}.entry").is_file()


def test_get_or_build_builds_once():
    build = counting("text")
    k = cache.key(SPEC)
    assert cache.get_or_build("source", k, build) == "text"
    assert cache.get_or_build("source", k, build) == "text"
    assert build.calls == 1


def test_only_str_and_dict_values_and_safe_names():
    with pytest.raises(TypeError):
        cache.store("source", cache.key(SPEC), ["not", "a", "dict"])
    for kind, k in (("../escape", "abc"), ("source", "../../etc/passwd"), ("", "abc")):
        with pytest.raises(ValueError):
            cache.store(kind, k, "x")


def test_disabled_cache_always_builds(cache_home, monkeypatch):
    monkeypatch.setenv("EINSUM_IR_CACHE", "0")
    build = counting("text")
    k = cache.key(SPEC)
    cache.get_or_build("source", k, build)
    cache.get_or_build("source", k, build)
    assert build.calls == 2 and not cache_home.exists()
    assert cache.info()["enabled"] is False


def test_unwritable_location_warns_and_still_builds(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("EINSUM_IR_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="einsum_ir.codegen.cache"):
        assert cache.get_or_build("source", cache.key(SPEC), lambda: "text") == "text"
    assert "cannot write" in caplog.text


# ------------------------------------------------------------------------------------- keys

def test_keys_are_canonical_and_distinguish_their_parts():
    a = cache.key(SPEC, "h100", "bf16", {"P": 1024, "M": 2048})
    assert a == cache.key(SPEC, "h100", "bf16", {"M": 2048, "P": 1024})
    assert re.fullmatch(r"[0-9a-f]{64}", a)
    others = {cache.key(SPEC, "h200", "bf16", {"P": 1024, "M": 2048}),
              cache.key(SPEC, "h100", "fp16", {"P": 1024, "M": 2048}),
              cache.key(SPEC + "# edited\n", "h100", "bf16", {"P": 1024, "M": 2048}),
              cache.key(SPEC, "h100", "bf16", {"P": 2048, "M": 1024})}
    assert a not in others and len(others) == 4
    with pytest.raises(TypeError):
        cache.key(object())  # a repr would differ per process


def test_new_triton_version_changes_every_key(monkeypatch):
    before, installed = cache.key(SPEC), cache.versions()
    monkeypatch.setattr(cache, "versions", lambda: {**installed, "triton": "99.0"})
    assert cache.key(SPEC) != before


# ------------------------------------------------------------------------------ bad entries

def _truncate(data, kind, k):
    return data[:-7]


def _header_only(data, kind, k):
    return data[:data.index(b"\n")]


def _empty(data, kind, k):
    return b""


def _garbage(data, kind, k):
    return bytes(range(256)) * 3


def _wrong_version(data, kind, k):
    return data.replace(f"einsum-ir-cache/{cache.FORMAT_VERSION} ".encode(), b"einsum-ir-cache/99 ", 1)


def _checksum_mismatch(data, kind, k):
    return data[:-1] + bytes([data[-1] ^ 0x01])  # same length, one bit flipped


def _signed_as(kind, k, encoding, payload):
    """An entry signed with this user's key: what only einsum-ir itself can write."""
    return cache._encode(kind, k, encoding, payload, cache._secret())


def _json_not_an_object(data, kind, k):
    return _signed_as(kind, k, "json", b"[1, 2]")


def _forged(data, kind, k):
    """What another user can write: a well-formed entry with a plain sha256, as format 1 had."""
    payload = b"import os; os.environ['PLANTED'] = '1'"
    digest = hashlib.sha256(payload).hexdigest()
    return f"einsum-ir-cache/{cache.FORMAT_VERSION} text {len(payload)} {digest}\n".encode() + payload


def _moved(data, kind, k):
    """A valid entry of another key, copied over this one."""
    return _signed_as(kind, cache.key("another spec"), "text", b"another kernel")


@pytest.mark.parametrize("damage, diagnosis", [
    (_truncate, "truncated?"), (_header_only, "not an einsum-ir cache entry"),
    (_empty, "not an einsum-ir cache entry"), (_garbage, "not an einsum-ir cache entry"),
    (_wrong_version, f"format '99', expected {cache.FORMAT_VERSION}"),
    (_checksum_mismatch, "checksum mismatch"), (_json_not_an_object, "not an object"),
    (_forged, "not written by this user"), (_moved, "not written by this user")],
    ids=["truncated", "header-only", "empty", "garbage", "wrong-version", "checksum-mismatch",
         "json-not-an-object", "forged", "moved"])
@pytest.mark.parametrize("kind, value", [("source", "def kernel():\n    pass\n" * 20),
                                         ("choice", {"BLOCK_M": 64, "num_stages": 3})])
def test_bad_entry_is_detected_deleted_and_rebuilt(damage, diagnosis, kind, value, caplog):
    k = cache.key(SPEC, kind)
    cache.store(kind, k, value)
    path = cache.cache_dir() / kind / f"{k}.entry"
    path.write_bytes(damage(path.read_bytes(), kind, k))
    build = counting(value)
    with caplog.at_level(logging.WARNING, logger="einsum_ir.codegen.cache"):
        assert cache.get_or_build(kind, k, build) == value
    assert build.calls == 1
    assert "bad entry" in caplog.text and diagnosis in caplog.text
    # The rebuilt entry is valid again: no second build, no second warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="einsum_ir.codegen.cache"):
        assert cache.get_or_build(kind, k, build) == value
    assert build.calls == 1 and not caplog.text


def test_bad_entry_is_deleted_on_load(caplog):
    k = cache.key(SPEC)
    cache.store("source", k, "text")
    path = cache.cache_dir() / "source" / f"{k}.entry"
    path.write_bytes(path.read_bytes()[:-1])
    with caplog.at_level(logging.WARNING, logger="einsum_ir.codegen.cache"):
        assert cache.load("source", k) is None
    assert not path.exists()


def test_a_fresh_entry_written_after_the_bad_read_survives():
    """A reader deletes the bad file it read, not the good one another process put there since."""
    k = cache.key(SPEC)
    path = cache.cache_dir() / "source" / f"{k}.entry"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    bad_inode = path.stat().st_ino
    cache.store("source", k, "fresh")
    cache._discard(path, bad_inode)
    assert cache.load("source", k) == "fresh"


# ------------------------------------------------------------------------------ concurrency

WORKER = r"""
import json, logging, sys
from einsum_ir.codegen import cache

warnings = []
class Collect(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("einsum_ir.codegen.cache").addHandler(Collect())

worker, rounds = int(sys.argv[1]), int(sys.argv[2])

def shared_value(key, writer):
    # Sizes differ per writer, so an interleaving of two writes cannot pass the checks.
    return f"{key}|{writer}|" + chr(65 + writer) * (40_000 + 3_000 * writer)

wrong = 0
for r in range(rounds):
    for s in range(3):
        key = f"shared{s}"
        cache.store("source", key, shared_value(key, worker))
        got = cache.load("source", key)
        if got is None or got != shared_value(key, int(got.split("|")[1])):
            wrong += 1
    cache.store("choice", f"own{worker}x{r}", {"worker": worker, "round": r, "pad": "y" * 5000})
print(json.dumps({"warnings": warnings, "wrong": wrong}))
"""


def test_concurrent_processes_never_tear_an_entry(cache_home):
    workers, rounds = 4, 40
    env = {**os.environ, "EINSUM_IR_CACHE_DIR": str(cache_home)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(w), str(rounds)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(workers)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert all(r == {"warnings": [], "wrong": 0} for r in results), results

    for s in range(3):
        got = cache.load("source", f"shared{s}")
        writer = int(got.split("|")[1])
        assert got == f"shared{s}|{writer}|" + chr(65 + writer) * (40_000 + 3_000 * writer)
    for w in range(workers):
        for r in range(rounds):
            assert cache.load("choice", f"own{w}x{r}") == {"worker": w, "round": r,
                                                          "pad": "y" * 5000}
    assert not list(cache_home.rglob("*.tmp")), "a writer left its temporary file behind"
    assert cache.info()["entries"] == 3 + workers * rounds


def test_concurrent_threads_never_tear_an_entry(cache_home):
    k = cache.key(SPEC)
    values = [str(t) * (20_000 + 1_000 * t) for t in range(8)]
    seen = []

    def hammer(value):
        for _ in range(20):
            cache.store("source", k, value)
            seen.append(cache.load("source", k))

    threads = [threading.Thread(target=hammer, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 160 and all(v in values for v in seen)
    assert not list(cache_home.rglob("*.tmp"))


# -------------------------------------------------------------------------------- location

def test_environment_relocates_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EINSUM_IR_CACHE_DIR", str(tmp_path / "first"))
    k = cache.key(SPEC)
    cache.store("source", k, "text")
    assert (tmp_path / "first" / "source" / f"{k}.entry").is_file()
    monkeypatch.setenv("EINSUM_IR_CACHE_DIR", str(tmp_path / "second"))
    assert cache.cache_dir() == tmp_path / "second"
    assert cache.load("source", k) is None

    monkeypatch.delenv("EINSUM_IR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "einsum_ir"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "einsum_ir"


# ----------------------------------------------------------------------------- shape buckets

SHAPES = {"B": 2, "H": 8, "P": 1000, "M": 1000, "E": 64, "F": 64}


def test_shape_bucket_rule():
    assert cache.shape_bucket(SHAPES) == {**SHAPES, "P": 1024, "M": 1024}
    assert cache.shape_bucket({**SHAPES, "P": 1024})["P"] == 1024
    assert cache.shape_bucket({**SHAPES, "P": 1025})["P"] == 2048
    assert cache.shape_bucket({**SHAPES, "P": 1, "M": 17}) == {**SHAPES, "P": 16, "M": 32}
    assert cache.shape_bucket({**SHAPES, "E": 65})["E"] == 65  # non-token dims stay exact
    assert cache.shape_bucket({"PX": 20, "P": 20}, token_ranks=("PX",)) == {"PX": 32, "P": 20}
    for bad in (0, -4, 3.0, True):
        with pytest.raises(ValueError):
            cache.shape_bucket({**SHAPES, "P": bad})


def test_sequence_lengths_in_one_bucket_share_a_key():
    def key_of(p, m):
        return cache.key(SPEC, "h100", "bf16", cache.shape_bucket({**SHAPES, "P": p, "M": m}))
    assert key_of(513, 700) == key_of(1024, 1000) == key_of(600, 1024)
    assert key_of(1024, 1024) != key_of(1025, 1024)
    assert key_of(1024, 1024) != key_of(1024, 1025)


# ------------------------------------------------------------------------ info, clear, CLI

def test_info_counts_and_clear_removes_only_our_files(cache_home):
    for i in range(3):
        cache.store("source", cache.key(SPEC, i), "x" * 100)
    cache.store("choice", cache.key(SPEC), {"BLOCK_M": 64})
    notes = cache_home / "source" / "notes.txt"
    notes.write_text("not a cache file")
    report = cache.info()
    assert report["location"] == str(cache_home) and report["enabled"] is True
    assert {k: v["entries"] for k, v in report["kinds"].items()} == {"choice": 1, "source": 3}
    sizes = sum(p.stat().st_size for p in cache_home.rglob("*.entry"))
    assert report["entries"] == 4 and report["bytes"] == sizes
    assert cache.clear() == 4
    assert notes.read_text() == "not a cache file"
    assert cache.info()["entries"] == 0 and not list(cache_home.rglob("*.entry"))


def test_info_on_a_missing_cache_creates_nothing(cache_home):
    assert cache.info()["entries"] == 0 and cache.clear() == 0
    assert not cache_home.exists()


def test_cli_cache_info_and_clear(cache_home, capsys):
    from einsum_ir.cli import main

    for i in range(2):
        cache.store("source", cache.key(SPEC, i), "y" * 2048)
    cache.store("choice", cache.key(SPEC), {"BLOCK_M": 64})
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(cache_home) in out and "enabled" in out
    assert re.search(r"source\s+2 entries\s+4\.\d KiB", out), out
    assert re.search(r"choice\s+1 entries", out) and re.search(r"total\s+3 entries", out), out

    assert main(["cache", "clear"]) == 0
    assert f"removed 3 entries from {cache_home}" in capsys.readouterr().out
    assert main(["cache", "info"]) == 0
    assert re.search(r"total\s+0 entries\s+0 B", capsys.readouterr().out)
