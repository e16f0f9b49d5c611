"""On-disk cache of generated kernel sources and kernel choices.

Layout: `<cache_dir()>/<kind>/<key>.entry`, one file per entry. `kind` names what is stored
("source": generated kernel text, "choice": an autotune winner as a JSON object); `key` is
`key(...)`, a sha256 over the canonical text of everything the value depends on.

An entry is one header line and the payload:

    einsum-ir-cache/2 json 123 <HMAC-SHA256 of kind, key, encoding and payload>\\n<payload: 123 bytes>

Generated source from here is imported and run, so an entry must be one this user wrote. The
cache folder is private (`private_dir`: this user's, 0700), and every entry carries an HMAC
keyed by `<cache_dir()>/secret`, 32 random bytes in a 0600 file made on first use. An entry
someone else wrote, copied from another key, or damaged fails its check and is rebuilt; a
folder another user owns is not used at all.

Writers put the whole entry in a temporary file in the same directory, then `os.replace` it
over the final name, so a reader sees either the old entry or the new one, never a mix, even
with many processes writing the same key. Temporary names carry the pid, thread and a random
part so concurrent writers never share one. A reader that finds a truncated, garbled, forged
or foreign-version entry logs a warning, deletes it and reports a miss, so the caller rebuilds;
the cache never raises because of its own files. Nothing is locked: two processes that miss
the same key at once both build it, and the last write wins (both values are valid).

Environment:
- `EINSUM_IR_CACHE_DIR`: the location (default `$XDG_CACHE_HOME/einsum_ir`, else
  `~/.cache/einsum_ir`).
- `EINSUM_IR_CACHE=0` (or `false`, `off`, `no`): no reads or writes; every lookup builds.
"""
from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import secrets
import stat
import threading
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Union

Value = Union[str, dict]

FORMAT_VERSION = 2  # 2: entries carry an HMAC, not a plain sha256 anyone could recompute
MAGIC = "einsum-ir-cache"
SUFFIX = ".entry"
TMP_SUFFIX = ".tmp"
SECRET = "secret"
SECRET_BYTES = 32
MIN_TOKEN_BUCKET = 16

log = logging.getLogger(__name__)

# Kinds and keys become path components; restricting them keeps every file inside the cache.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PACKAGES = ("einsum_ir", "einsum_ir.cost_model", "einsum_ir.lowering", "einsum_ir.codegen")


def cache_dir() -> Path:
    """Where entries live: `$EINSUM_IR_CACHE_DIR`, else `$XDG_CACHE_HOME/einsum_ir`, else
    `~/.cache/einsum_ir`. Read on every call so a changed environment takes effect at once."""
    explicit = os.environ.get("EINSUM_IR_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "einsum_ir"


class UnsafeCacheDir(PermissionError):
    """The cache folder belongs to another user, so anything in it may be theirs: nothing is
    read from it, written to it or imported from it."""


def _private(folder: Path) -> Path:
    """`folder`, made 0700 when missing. One of ours with looser permissions (einsum-ir before
    0700 folders made them 0755) is tightened; one another user owns is refused."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.stat()  # follows a symlink: the folder it names is what must be private
    if info.st_uid != os.getuid():
        raise UnsafeCacheDir(
            f"refusing the einsum-ir cache folder {folder}: it belongs to uid {info.st_uid}, not "
            f"to you (uid {os.getuid()}), so its files could be anyone's; remove it or set "
            f"EINSUM_IR_CACHE_DIR to a folder of your own")
    if info.st_mode & 0o077:
        os.chmod(folder, 0o700)
    return folder


def private_dir(*sub: str) -> Path:
    """`cache_dir()` (and its subfolders `sub`), each checked private to this user as in
    `_private`; raises UnsafeCacheDir (an OSError) otherwise."""
    folder = _private(cache_dir())
    for name in sub:
        folder = _private(folder / name)
    return folder


def _read_secret(path: Path) -> bytes | None:
    """The key in `path`, or None when there is none we can trust (then the file is removed):
    it must be a plain file of ours, 0600, of the right size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:  # a symlink (ELOOP) or unreadable: not a key we made
        data, trusted = b"", False
    else:
        with os.fdopen(fd, "rb") as f:
            info, data = os.fstat(f.fileno()), f.read(SECRET_BYTES + 1)
        trusted = (stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
                   and not info.st_mode & 0o077 and len(data) == SECRET_BYTES)
    if trusted:
        return data
    log.warning("einsum-ir cache: replacing %s, which is not a private key file of yours", path)
    path.unlink(missing_ok=True)
    return None


def _secret() -> bytes:
    """This user's key for the entries' HMACs, made on first use. It is written whole to a
    temporary file and then linked into place, so a concurrent reader never sees a partial key
    and of two processes that make one at once, both end up using the first."""
    path = private_dir() / SECRET
    key = _read_secret(path)
    if key is None:
        tmp = temporary_path(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(SECRET_BYTES))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made one first: use theirs
        finally:
            tmp.unlink()
        key = _read_secret(path)
    if key is None:
        raise UnsafeCacheDir(f"cannot make a private key file {path}")
    return key


def temporary_path(path: Path) -> Path:
    """A name next to `path` that no other writer (process or thread) uses at the same time."""
    return path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}."
                          f"{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def _mac(secret: bytes, kind: str, key: str, encoding: str, payload: bytes) -> str:
    """Binds the payload to its kind and key too, so a valid entry moved to another name fails."""
    return hmac.new(secret, f"{kind}/{key} {encoding}\n".encode() + payload, hashlib.sha256).hexdigest()


def enabled() -> bool:
    """False when `EINSUM_IR_CACHE` is 0/false/off/no."""
    return os.environ.get("EINSUM_IR_CACHE", "1").strip().lower() not in ("0", "false", "off", "no")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@lru_cache(maxsize=None)
def _code_fingerprint() -> str:
    """A hash of this distribution's Python sources. An editable install keeps its version
    number while the emitter changes under it; hashing the code keeps stale kernels out."""
    digest = hashlib.sha256()
    for package in _PACKAGES:  # found without importing them: the layers live in their own folders
        folder = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)))
        for path in sorted(folder.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(folder).as_posix()}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=None)
def versions() -> dict[str, str]:
    """What every key depends on besides its parts: the format, the einsum-ir and Triton
    versions (read from package metadata, so Triton is never imported here) and the code."""
    return {"format": str(FORMAT_VERSION), "einsum-ir": _version("einsum-ir"),
            "triton": _version("triton"), "code": _code_fingerprint()}


def key(*parts: object) -> str:
    """A stable sha256 (hex) over `parts` and `versions()`.

    Parts must be JSON data (str, int, float, bool, None, lists, tuples, dicts with str keys):
    pass a cascade as `str(cascade)`, its canonical spec text. Dict order does not matter.
    Anything else raises TypeError, because a `repr` may hold memory addresses and would give a
    different key in every process.
    """
    text = json.dumps([versions(), list(parts)], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def shape_bucket(shapes: Mapping[str, int], token_ranks: tuple[str, ...] = ("P", "M")
                 ) -> dict[str, int]:
    """The dispatch bucket of `shapes`: token extents rounded up, every other dim exact.

    Rule: a dim named in `token_ranks` (the sequence lengths: queries P, keys M) becomes the
    smallest power of two that is >= its extent and >= 16; all other dims (batch, heads, head
    sizes, ...) are kept as they are. So P = 1000 and P = 1024 share the bucket 1024, P = 1025
    is in 2048, and every P <= 16 is in 16. Kernels take the true extents at run time and mask
    the last tile, so one compiled kernel serves its whole bucket: a new sequence length inside
    a compiled bucket generates no code and compiles nothing. Use the bucket in `key(...)`.
    """
    bucket = {}
    for dim, extent in shapes.items():
        if isinstance(extent, bool) or not isinstance(extent, int) or extent < 1:
            raise ValueError(f"extent of {dim} must be a positive int, got {extent!r}")
        bucket[dim] = max(MIN_TOKEN_BUCKET, 1 << (extent - 1).bit_length()) \
            if dim in token_ranks else extent
    return bucket


def _path(kind: str, key: str) -> Path:
    for what, name in (("kind", kind), ("key", key)):
        if not _NAME.fullmatch(name):
            raise ValueError(f"cache {what} must match {_NAME.pattern}, got {name!r}")
    return cache_dir() / kind / (key + SUFFIX)


def _payload(value: Value) -> tuple[str, bytes]:
    if isinstance(value, str):
        return "text", value.encode()
    if isinstance(value, dict):
        return "json", json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False).encode()
    raise TypeError(f"cache values are str or dict, got {type(value).__name__}")


def _encode(kind: str, key: str, encoding: str, payload: bytes, secret: bytes) -> bytes:
    mac = _mac(secret, kind, key, encoding, payload)
    return f"{MAGIC}/{FORMAT_VERSION} {encoding} {len(payload)} {mac}\n".encode() + payload


def _decode(data: bytes, kind: str, key: str, secret: bytes) -> Value:
    """The value in the bytes of entry (kind, key); ValueError saying what is wrong with a bad
    entry."""
    header, newline, payload = data.partition(b"\n")
    fields = header.decode("ascii", errors="replace").split(" ")
    if not newline or len(fields) != 4 or not fields[0].startswith(MAGIC + "/"):
        raise ValueError("not an einsum-ir cache entry")
    tag, encoding, length, mac = fields
    if tag != f"{MAGIC}/{FORMAT_VERSION}":
        raise ValueError(f"format {tag.partition('/')[2]!r}, expected {FORMAT_VERSION}")
    if length != str(len(payload)):
        raise ValueError(f"payload is {len(payload)} bytes, header says {length} (truncated?)")
    if not hmac.compare_digest(_mac(secret, kind, key, encoding, payload), mac):
        raise ValueError("checksum mismatch (damaged, or not written by this user's einsum-ir)")
    if encoding == "text":
        return payload.decode()
    if encoding == "json":
        value = json.loads(payload)
        if not isinstance(value, dict):
            raise ValueError(f"json payload is a {type(value).__name__}, not an object")
        return value
    raise ValueError(f"unknown payload encoding {encoding!r}")


def load(kind: str, key: str) -> Value | None:
    """The cached value, or None on a miss, when disabled, or when the entry is bad (then it is
    deleted and a warning is logged)."""
    if not enabled():
        return None
    path = _path(kind, key)
    try:
        with open(path, "rb") as f:
            data = f.read()
            inode = os.fstat(f.fileno()).st_ino
        secret = _secret()  # checks that the folder is private before anything in it is trusted
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("einsum-ir cache: cannot read %s (%s); rebuilding", path, err)
        return None
    try:
        return _decode(data, kind, key, secret)
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
        log.warning("einsum-ir cache: bad entry %s (%s); deleting and rebuilding", path, err)
        _discard(path, inode)
        return None


def _discard(path: Path, inode: int) -> None:
    """Delete the bad file we read, unless another process has already replaced it with a
    fresh entry (a different inode), which must survive."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass  # gone already, or not ours to delete: either way the caller rebuilds


def store(kind: str, key: str, value: Value) -> None:
    """Write an entry atomically. Failures to write (read-only or full disk) log a warning:
    the cache only saves time, so it must never stop a kernel from running."""
    if not enabled():
        return
    path = _path(kind, key)
    encoding, payload = _payload(value)
    tmp = temporary_path(path)
    try:
        data = _encode(kind, key, encoding, payload, _secret())
        private_dir(kind)
        # No fsync: an entry torn by a power loss fails its checksum and is rebuilt.
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("einsum-ir cache: cannot write %s (%s)", path, err)
        try:
            tmp.unlink()
        except OSError:
            pass


def get_or_build(kind: str, key: str, build: Callable[[], Value]) -> Value:
    """The cached value of (kind, key) if a valid one exists; otherwise `build()` (called once),
    stored, and returned."""
    value = load(kind, key)
    if value is None:
        value = build()
        store(kind, key, value)
    return value


def _kind_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))


def _our_files(kind_dir: Path) -> list[Path]:
    """Entries and leftover temporaries of crashed writers; any other file is not ours."""
    return [p for p in kind_dir.iterdir()
            if p.is_file() and (p.name.endswith(SUFFIX) or p.name.endswith(TMP_SUFFIX))]


def info() -> dict:
    """{"location", "enabled", "kinds": {kind: {"entries", "bytes"}}, "entries", "bytes"};
    bytes include leftover temporaries, entries do not. Creates nothing."""
    root = cache_dir()
    kinds = {}
    for kind_dir in _kind_dirs(root):
        files = _our_files(kind_dir)
        kinds[kind_dir.name] = {
            "entries": sum(p.name.endswith(SUFFIX) for p in files),
            "bytes": sum(_size(p) for p in files)}
    return {"location": str(root), "enabled": enabled(), "kinds": kinds,
            "entries": sum(k["entries"] for k in kinds.values()),
            "bytes": sum(k["bytes"] for k in kinds.values())}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # removed by a concurrent writer or clear
        return 0


def clear() -> int:
    """Delete every entry (and leftover temporary); returns how many entries were removed.
    Only our own files go, so a cache dir pointed at a shared folder loses nothing else."""
    removed = 0
    for kind_dir in _kind_dirs(cache_dir()):
        files = _our_files(kind_dir)
        for path in files:
            try:
                path.unlink()
            except OSError:
                continue
            removed += path.name.endswith(SUFFIX)
        if files:
            try:
                kind_dir.rmdir()  # succeeds only when nothing else is left in it
            except OSError:
                pass
    return removed
