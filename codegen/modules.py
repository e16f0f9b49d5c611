"""Loading generated Triton modules, interpreted (CPU tensors) or compiled (CUDA).

Triton's JIT reads a kernel's source back from its file, so a generated module is written to a
file and imported from it. The files live in this user's private cache folder
(`cache.private_dir("modules")`: 0700, refused when another user owns it), a file is rewritten
unless it already holds exactly the generated source, and what runs is that source itself,
compiled from memory (no bytecode cache is read), so no file another user planted can run.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

from einsum_ir.codegen import cache, dispatch


_MODULES: dict[str, object] = {}


def module_folder() -> Path:
    """This user's folder of generated modules, inside the kernel cache."""
    return cache.private_dir("modules")


def _holds(path: Path, source: str) -> bool:
    try:
        return path.read_text() == source
    except (OSError, UnicodeDecodeError):
        return False


def import_source(source: str, prefix: str, interpret: bool) -> ModuleType:
    """Import generated source from a file (Triton's JIT reads the function source back), named
    `<prefix>_<hash>`. The file is (re)written unless it already holds exactly `source`. With
    `interpret`, the module is imported under TRITON_INTERPRET=1 so its kernels run on CPU
    tensors in Triton's interpreter; otherwise they compile for the GPU."""
    key = hashlib.sha256(source.encode()).hexdigest()[:24]
    path = module_folder() / f"{prefix}_{key}.py"
    if not _holds(path, source):
        tmp = cache.temporary_path(path)  # written whole, then renamed
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(source)
        os.replace(tmp, path)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        name = f"einsum_ir_{prefix}_{key}" + ("_interp" if interpret else "")
        mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
        sys.modules[name] = mod
        # `source`, not the file: what runs is the text we generated, whatever the file holds
        exec(compile(source, str(path), "exec"), mod.__dict__)  # noqa: S102 - our own generated code
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return mod


def load_module(source: str, interpret: bool = False) -> ModuleType:
    """The generated module, imported once per process (see `import_source`)."""
    mkey = hashlib.sha1(source.encode()).hexdigest()[:16] + ("_interp" if interpret else "")
    if mkey in _MODULES:
        return _MODULES[mkey]
    mod = import_source(source, "k", interpret)
    _MODULES[mkey] = mod
    dispatch.STATS["module_load"] += 1
    return mod


def check_interpreter() -> None:
    """CPU tensors run in Triton's interpreter, which works only if triton was first imported
    with TRITON_INTERPRET=1 (its library functions are built differently)."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        import triton  # noqa: F401
        return
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if isinstance(tl.standard.cdiv, JITFunction):
        raise RuntimeError("CPU tensors run the generated Triton in its interpreter: set "
                           "TRITON_INTERPRET=1 before importing triton (or pass CUDA tensors)")


def check_compiler() -> None:
    """CUDA tensors need Triton's compiler, unusable if triton was imported interpreted."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if not isinstance(tl.standard.cdiv, JITFunction):
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1, so generated kernels "
                           "cannot compile for the GPU; unset it to run on CUDA tensors")


class interpret_env:
    """TRITON_INTERPRET=1 while a CPU launch runs (the interpreter reads it lazily), without the
    interpreter's numpy RuntimeWarnings: it evaluates masked-off lanes too (1/0 past the last
    row), whose values never reach an output, so the warning is noise to the caller."""

    def __enter__(self):
        self.old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        self.quiet = warnings.catch_warnings()
        self.quiet.__enter__()
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")

    def __exit__(self, *exc):
        self.quiet.__exit__(*exc)
        if self.old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = self.old
