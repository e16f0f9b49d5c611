"""Compile every fused catalog kernel with another Triton version (AOT, no GPU needed).

The GPU machines run an older Triton than this checkout; this checks the generated source
against it. The kernels are generated here; a second Python that has only `triton` installed
compiles them for sm_90 and sm_80 and reports registers, spills and wgmma:

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    .venv/bin/python scripts/aot_compat.py --python /tmp/t36/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

COMPILE = r'''
import json, importlib.util, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
mods, bad = {}, 0
print("triton", triton.__version__)
for r in json.load(open(sys.argv[1])):
    if r["path"] not in mods:
        spec = importlib.util.spec_from_file_location("m_" + r["variant"], r["path"])
        m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)
        mods[r["path"]] = m
    fn = getattr(mods[r["path"]], r["name"])
    attrs = {(p,): [["tt.divisibility", 16]] for p in r["divisible"]}
    for cap in (90, 80):
        try:
            ck = triton.compile(ASTSource(fn, r["signature"], r["constexprs"], attrs),
                                target=GPUTarget("cuda", cap, 32), options=r["options"])
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
                fh.write(ck.asm["cubin"])
            o = subprocess.run([cuobjdump, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
            regs, spill = re.search(r"REG:(\d+)", o).group(1), re.search(r"LOCAL:(\d+)", o).group(1)
            w = "wgmma" in ck.asm["ptx"]
            print(f"{r['variant']:28s} {r['name']} d={r['d']} sm_{cap} regs={regs} spills={spill} wgmma={w}")
            bad += spill != "0" or (cap == 90 and not w and not r["name"].endswith("_blocks"))
        except Exception as e:
            bad += 1
            print(f"{r['variant']:28s} {r['name']} d={r['d']} sm_{cap} FAIL {type(e).__name__}: {str(e)[:300]}")
print("problems:", bad)
sys.exit(1 if bad else 0)
'''


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", required=True, help="a Python whose triton compiles the kernels")
    args = ap.parse_args()
    import einsum_ir as ei
    from einsum_ir.codegen.aot import specialization
    from einsum_ir.codegen.report import default_shapes

    folder = tempfile.mkdtemp(prefix="einsum_ir_compat_")
    requests = []
    for name in ei.variants.names():
        c = ei.variants.load(name)
        try:
            kern = ei.compile(c, backend="triton")
        except ei.LoweringError:
            continue
        path = os.path.join(folder, f"{name}.py")
        with open(path, "w") as fh:
            fh.write(kern._source)
        for d in (64, 128):
            for i, em in enumerate(kern.emitters):
                spec = specialization(kern, i, default_shapes(c, d))
                requests.append({"variant": name, "d": d, "path": path, **spec})
                if em.list_emitter is not None:  # the block-list kernel, same arguments
                    requests.append({"variant": name, "d": d, "path": path,
                                     **dict(spec, name=em.list_emitter.name)})
    req = os.path.join(folder, "requests.json")
    with open(req, "w") as fh:
        json.dump(requests, fh)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([args.python, "-c", COMPILE, req], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
