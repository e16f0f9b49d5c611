"""Generated code is never loaded from a place another user can write (issue 15): not from the
old predictable `$TMPDIR/einsum_ir_triton/k_<sha1>.py`, not from a file planted under the name
the module folder uses, not from a forged cache entry, and not from a folder another user owns.
Each planted file, if it ran, would create a marker file; the tests check that none does."""
import hashlib
import logging
import os
import stat
import tempfile

import pytest
import torch

import einsum_ir as ei
from einsum_ir.codegen import cache, dispatch, kernel, modules
from support import fresh, make_inputs, on_kernel_device  # noqa: F401 - fresh: a fixture

pytest.importorskip("triton")

SOURCE = "VALUE = 'generated'\n"


def planted(marker) -> str:
    """Code that leaves `marker` behind if it ever runs."""
    return f"open({str(marker)!r}, 'w').close()\nVALUE = 'planted'\n"


def _run_softmax_causal() -> None:
    c = ei.variants.load("softmax_causal")
    args = on_kernel_device(make_inputs("softmax_causal", c, P=16, M=16, E=16, F=16))
    torch.testing.assert_close(ei.compile(c, backend="triton")(**args), ei.interpret(c, **args),
                               atol=1e-4, rtol=1e-4)


def test_a_file_at_the_old_predictable_path_is_not_run(fresh, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "shared_tmp"))
    c = ei.variants.load("softmax_causal")
    source = kernel.kernel_source(kernel.build_plan(c), c)
    old = tmp_path / "shared_tmp" / "einsum_ir_triton" / f"k_{hashlib.sha1(source.encode()).hexdigest()[:16]}.py"
    old.parent.mkdir(parents=True)
    marker = tmp_path / "ran"
    old.write_text(planted(marker) + source)
    _run_softmax_causal()
    assert not marker.exists()


def test_a_file_planted_under_the_module_name_is_replaced_not_run(fresh, tmp_path):
    path = modules.module_folder() / f"k_{hashlib.sha256(SOURCE.encode()).hexdigest()[:24]}.py"
    marker = tmp_path / "ran"
    path.write_text(planted(marker))
    mod = modules.import_source(SOURCE, "k", interpret=True)
    assert mod.VALUE == "generated" and not marker.exists()
    assert path.read_text() == SOURCE  # rewritten, so Triton's JIT reads our source back too


def test_a_forged_source_entry_is_rebuilt_not_run(fresh, tmp_path, caplog):
    """Another user can write a well-formed entry with a checksum, but not the HMAC of our key."""
    c = ei.variants.load("softmax_causal")
    marker = tmp_path / "ran"
    payload = (planted(marker) + "\n").encode()
    entry = cache._path("source", cache.key(str(c), "triton"))
    entry.parent.mkdir(parents=True)
    entry.write_bytes(f"einsum-ir-cache/{cache.FORMAT_VERSION} text {len(payload)} "
                      f"{hashlib.sha256(payload).hexdigest()}\n".encode() + payload)
    with caplog.at_level(logging.WARNING, logger="einsum_ir.codegen.cache"):
        _run_softmax_causal()
    assert not marker.exists() and "not written by this user" in caplog.text
    assert dispatch.STATS["emit"] == 1


def test_folders_are_made_private_and_loose_ones_of_ours_are_tightened(fresh):
    folder = modules.module_folder()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700 == stat.S_IMODE(folder.stat().st_mode)
    os.chmod(fresh, 0o777)
    modules.module_folder()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    cache.store("choice", "k1", {"BLOCK_M": 64})
    secret = fresh / cache.SECRET
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_a_folder_another_user_owns_is_refused(fresh, monkeypatch, caplog):
    modules.module_folder()
    cache.store("choice", "k1", {"BLOCK_M": 64})
    owner = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)  # now the folder is someone else's
    with pytest.raises(cache.UnsafeCacheDir, match="belongs to uid .* set EINSUM_IR_CACHE_DIR"):
        modules.import_source(SOURCE, "k", interpret=True)
    with caplog.at_level(logging.WARNING, logger="einsum_ir.codegen.cache"):
        assert cache.get_or_build("choice", "k1", lambda: {"BLOCK_M": 32}) == {"BLOCK_M": 32}
    assert "refusing the einsum-ir cache folder" in caplog.text


def test_a_key_file_that_is_not_private_is_replaced(fresh, caplog):
    cache.store("choice", "k1", {"BLOCK_M": 64})
    secret = fresh / cache.SECRET
    os.chmod(secret, 0o644)  # readable by others: anyone could have signed entries with it
    with caplog.at_level(logging.WARNING, logger="einsum_ir.codegen.cache"):
        assert cache.load("choice", "k1") is None
    assert "not a private key file" in caplog.text
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
