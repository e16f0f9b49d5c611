"""Runtime dispatch per (device, dtype, shape bucket), autotuning candidates and pruning, the one
on-disk cache, and param binding shared by every backend (DESIGN sections 4, 6)."""
import logging

import pytest
import torch
from support import UNLOWERED, KERNEL_DEVICE, assert_outputs_close, fresh, make_inputs  # noqa: F401 - fresh: a fixture

import einsum_ir as ei
from einsum_ir.codegen import autotune, cache, dispatch, kernel
from einsum_ir.codegen.dispatch import Config
from einsum_ir.params import evaluate_params

triton = pytest.importorskip("triton")


def _close(out, ref):
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


# --------------------------------------------------------------------------- buckets, keys

def test_token_ranks_are_the_tiled_sequence_ranks():
    tok = lambda name: dispatch.token_ranks(ei.compile(ei.variants.load(name), backend="triton").plan)
    assert tok("softmax_causal") == ("P", "M")
    assert tok("softmax_gqa") == ("P", "M")  # R packs whole into the query tile: kept exact
    assert set(tok("nbhd_2d")) == {"PX", "PY", "MX", "MY"}
    assert tok("agent_attention") == ("N", "M", "P")  # two stages: agents over keys, queries over agents


def test_dispatch_key_buckets_lengths_and_keeps_other_dims():
    ext = {"B": 2, "H": 8, "R": 3, "P": 1000, "M": 1000, "E": 64, "F": 64}
    key = lambda **kw: dispatch.dispatch_key(torch.device("cpu"), torch.bfloat16, {**ext, **kw},
                                             ("P", "M"))
    assert key() == key(P=1024, M=513) != key(P=1025)
    assert key().extents() == {**ext, "P": 1024, "M": 1024}
    assert key().device == "cpu" and key().dtype == "bf16"
    assert key(H=16) != key() and key(R=4) != key()


# --------------------------------------------------------------------------- no new code per length

def test_new_length_in_a_compiled_bucket_generates_and_compiles_nothing(fresh):
    c = ei.variants.load("softmax_causal")
    kern = ei.compile(c, backend="triton")
    stats = dispatch.STATS
    assert stats == {"emit": 1}
    # extents are run-time arguments Triton must not specialize on: no length in the source
    assert "do_not_specialize=['B', 'H', 'P', 'M']" in kern.source()
    counts = []
    for P, M in ((20, 23), (29, 31), (40, 33)):  # buckets 32, 32, 64
        args = make_inputs("softmax_causal", c, P=P, M=M, E=16, F=16, device=KERNEL_DEVICE)
        assert_outputs_close(kern(**args), ei.interpret(c, **args))
        counts.append((stats["emit"], stats["module_load"], stats["config"]))
    assert counts == [(1, 1, 1), (1, 1, 1), (1, 1, 2)]
    assert [dict(k.bucket)["P"] for k in kern.configs] == [32, 64]
    # a second kernel object of the same cascade reuses the source and the module
    ei.compile(c, backend="triton")(**make_inputs("softmax_causal", c, P=20, M=20, E=16, F=16,
                                                  device=KERNEL_DEVICE))
    assert (stats["emit"], stats["module_load"]) == (1, 1)


@pytest.mark.parametrize("name,small,large", [
    ("nbhd_2d", {"PX": 5, "PY": 12, "MX": 5, "MY": 12}, {"PX": 12, "PY": 16, "MX": 9, "MY": 16}),
    ("softmax_gqa", {"P": 1000, "M": 999}, {"P": 1024, "M": 1001})])
def test_what_the_gpu_compiles_is_the_same_across_a_bucket(name, small, large):
    # Triton's JIT keys its binaries on this (types, constexprs incl. tiles, alignment, options);
    # tiles come from the bucket, so a 5-wide and a 12-wide 2-D window share one binary
    from einsum_ir.codegen.aot import specialization

    kern = ei.compile(ei.variants.load(name), backend="triton")
    base = {"B": 1, "H": 8, "G": 2, "R": 4, "E": 64, "F": 64}
    shapes = lambda ext: {d: {**base, **ext}[d] for d in kern.cascade.dims}
    key = lambda ext: dispatch.bucket_of(shapes(ext), kern.token_ranks)
    assert key(small) == key(large)
    for i in range(len(kern.plan.stages)):
        assert specialization(kern, i, shapes(small)) == specialization(kern, i, shapes(large))


def test_generated_source_goes_through_the_disk_cache(fresh, monkeypatch):
    c = ei.variants.load("softmax_window")
    src = ei.compile(c, backend="triton").source()
    assert cache.info()["kinds"]["source"]["entries"] == 1
    monkeypatch.setattr(kernel, "_SOURCES", {})  # a new process: memory is empty, disk is not
    assert ei.compile(c, backend="triton").source() == src
    assert dispatch.STATS["emit"] == 1
    monkeypatch.setattr(kernel, "_SOURCES", {})
    monkeypatch.setenv("EINSUM_IR_CACHE", "0")
    ei.compile(c, backend="triton")
    assert dispatch.STATS["emit"] == 2


# --------------------------------------------------------------------------- backends

def test_auto_runs_the_cpu_path_on_cpu_tensors():
    c = ei.variants.load("softmax_causal")
    kern = ei.compile(c)
    args = make_inputs("softmax_causal", c, P=37, M=37, E=16, F=16)
    assert kern.kernel_for(args).backend == "cpu"
    _close(kern(**args), ei.interpret(c, **args))
    assert kern.why_not_fused is None


def test_auto_falls_back_to_the_interpreter_and_says_why_once(caplog):
    c = ei.parse(UNLOWERED)
    kern = ei.compile(c)
    assert "no query-key score contraction" in kern.why_not_fused
    args = make_inputs("linear_elu", c, P=9, M=9, E=8, F=8)
    with caplog.at_level(logging.INFO, logger="einsum_ir"):
        for _ in range(2):
            _close(kern(**args), ei.interpret(c, **args))
    said = [r for r in caplog.records if "reference interpreter" in r.getMessage()]
    assert len(said) == 1 and "no query-key score contraction" in said[0].getMessage()


def test_single_backends_raise_instead_of_falling_back():
    c = ei.parse(UNLOWERED)
    for backend in ("cpu", "triton"):
        with pytest.raises(ei.LoweringError, match="no query-key score contraction"):
            ei.compile(c, backend=backend)
    assert ei.compile(ei.variants.load("softmax"), backend="cpu").backend == "cpu"


# --------------------------------------------------------------------------- autotuning

SHAPES = {"B": 1, "H": 8, "P": 4096, "M": 4096, "E": 64, "F": 64}


def _plan(name="softmax_causal"):
    return ei.compile(ei.variants.load(name), backend="triton").plan


def test_candidates_cover_the_grid():
    cands = autotune.candidates()
    assert len(cands) == len(set(cands)) == 2 * 3 * 2 * 3
    assert Config(128, 64, 8, 2) in cands and Config(64, 32, 4, 4) in cands


def test_prune_drops_what_does_not_fit_and_keeps_the_top_k():
    verdicts = autotune.prune(_plan(), SHAPES, "h100", "bf16", top_k=3)
    assert len(verdicts) == len(autotune.candidates())
    keep = [v for v in verdicts if v.reason is None]
    assert len(keep) == 3 and [v.est_us for v in keep] == sorted(v.est_us for v in keep)
    assert all(v.est_us <= w.est_us for v in keep for w in verdicts if w.reason and "top" in w.reason)
    # 128x128 fp32 accumulators on 4 warps need more registers than a thread has
    big = next(v for v in verdicts if v.config == Config(128, 128, 4, 2))
    assert big.reason.startswith("~") and "registers" in big.reason


def test_prune_uses_the_device_shared_memory():
    shapes = {**SHAPES, "E": 256, "F": 256}
    on = lambda dev: {v.config: v for v in autotune.prune(_plan(), shapes, dev, "bf16")}
    cfg = Config(64, 64, 4, 3)  # 3 stages x (K + V) 64x256 bf16 tiles + Q: 224 KiB
    assert on("h100")[cfg].shared_bytes == 3 * 2 * 64 * 256 * 2 + 64 * 256 * 2
    assert "shared memory" not in (on("h100")[cfg].reason or "")
    assert on("l4")[cfg].reason.startswith("shared memory")  # 100 KiB per SM


def test_prune_drops_configs_that_spill_when_measured():
    cfg = Config(128, 64, 8, 2)
    usage = {cfg: {"registers": 255, "spills": 96, "shared_bytes": 1024}}
    verdict = {v.config: v for v in autotune.prune(_plan(), SHAPES, "h100", usage=usage)}[cfg]
    assert verdict.reason == "spills 96 B (AOT)" and verdict.measured


def test_choose_times_the_survivors_once_and_remembers_the_winner(fresh, monkeypatch):
    kern = ei.compile(ei.variants.load("softmax_causal"), backend="triton")
    key = dispatch.DispatchKey("cuda:90", "bf16", dispatch.bucket_of(SHAPES, kern.token_ranks))
    timed = []

    def fake_timing(run, configs):  # the GPU step: the last survivor is fastest here
        timed.append(list(configs))
        return {cfg: 1.0 / (i + 1) for i, cfg in enumerate(configs)}

    monkeypatch.setattr(autotune, "time_configs", fake_timing)
    best = autotune.choose(kern, key, run=None, device="h100")
    assert timed == [autotune.survivors(autotune.prune(kern.plan, key.extents(), "h100"))]
    assert best == timed[0][-1]
    assert autotune.choose(kern, key, run=None, device="h100") == best and len(timed) == 1
    assert cache.info()["kinds"]["choice"]["entries"] == 1


def test_pruned_best_compiles_survivors_ahead_of_time():
    kern = ei.compile(ei.variants.load("softmax_causal"), backend="triton")
    best = autotune.pruned_best(kern, SHAPES, "h100", "bf16")
    assert best in autotune.survivors(autotune.prune(kern.plan, SHAPES, "h100"))
    assert kern.resource_usage(SHAPES, config=best)["spills"] == 0
    assert cache.info()["kinds"]["aot"]["entries"] >= 1  # AOT results live in the one cache


def test_report_has_the_pruned_config_for_h100():
    from einsum_ir.codegen.report import CONFIG_COLUMN, report_columns

    cols = report_columns("softmax_causal", ei.variants.load("softmax_causal"))
    assert CONFIG_COLUMN == "config (h100, pruned-best)"
    assert str(Config(*map(int, cols[CONFIG_COLUMN].replace("x", " ").replace("w", "")
                            .replace("s", "").split()))) == cols[CONFIG_COLUMN]
    assert report_columns("unlowered", ei.parse(UNLOWERED))[CONFIG_COLUMN] == "-"
    assert report_columns("flowformer", ei.variants.load("flowformer"))[CONFIG_COLUMN].startswith("chunk 64")


def test_tune_command_prints_the_candidates(capsys):
    from einsum_ir.cli import main

    rc = main(["tune", "softmax_causal", "--shapes", "B=1,H=8,P=4096,M=4096,E=64,F=64", "--no-aot",
               "--top-k", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count(" keep") == 2 and "not in the top 2 estimates" in out and "registers/thread" in out
    assert "pruned-best (no GPU to time on):" in out or "winner (timed):" in out


# --------------------------------------------------------------------------- params

def test_params_evaluate_once_for_every_backend():
    c = ei.parse("dims P E\nparam scale = 1/sqrt(E)\nparam half = E // 2\nparam W: int\n"
                 "input Q[p,e]\nO[p] = Q[p,e] * scale + half + W\noutput O\n")
    assert evaluate_params(c, {"P": 3, "E": 64}, {"W": torch.tensor(5)}) == {
        "scale": 0.125, "half": 32, "W": 5}
    with pytest.raises(ei.BindError, match="missing param W"):
        evaluate_params(c, {"P": 3, "E": 64}, {})
    with pytest.raises(ei.BindError, match="derived in the spec"):
        evaluate_params(c, {"P": 3, "E": 64}, {"W": 1, "scale": 2.0})


# --------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="timing candidates needs a CUDA GPU")
def test_gpu_autotune_times_survivors_and_remembers_the_winner(fresh):
    c = ei.variants.load("softmax_causal")
    kern = ei.compile(c)
    args = make_inputs("softmax_causal", c, P=1000, M=1000, E=64, F=64, H=4, dtype=torch.bfloat16,
                       device="cuda")
    ref = ei.interpret(c, **{k: v.float() for k, v in args.items()})
    torch.testing.assert_close(kern(**args).float(), ref, atol=3e-2, rtol=3e-2)
    assert cache.info()["kinds"]["choice"]["entries"] == 1
    tri = kern.triton
    fn = getattr(kernel.load_module(tri._source), tri.emitters[0].name)
    compiled = sum(len(c[0]) for c in fn.device_caches.values())
    args2 = make_inputs("softmax_causal", c, P=1021, M=1021, E=64, F=64, H=4, dtype=torch.bfloat16,
                        device="cuda")
    kern(**args2)  # same bucket (1024): no new config, no new binary
    assert sum(len(c[0]) for c in fn.device_caches.values()) == compiled
    assert dispatch.STATS["config"] == 1
    again = ei.compile(c)  # a new kernel object: the choice comes from the disk cache, untimed
    again(**args)
    assert next(iter(again.triton.configs.values())) == next(iter(tri.configs.values()))


def test_shared_memory_model_matches_the_compiled_kernels():
    """The pruning's shared-memory estimate is the compiled kernel's (bounded above where a tile
    is gathered: Triton's scratch for it varies)."""
    from einsum_ir.codegen.aot import resource_usage_batch
    from einsum_ir.codegen.report import default_shapes
    from einsum_ir.cost_model.devices import get

    configs = (Config(128, 64, 8, 2), Config(64, 32, 4, 4))
    names = ("softmax", "bias_tensor", "flashbias_lowrank", "moba")
    items = [(ei.compile(ei.variants.load(n), backend="triton"), n, cfg) for n in names for cfg in configs]
    usage = resource_usage_batch([(k, default_shapes(k.cascade, 64), "bf16", "sm_90", cfg)
                                  for k, _, cfg in items])
    for (kern, name, cfg), u in zip(items, usage):
        model = autotune.estimate(kern.plan, default_shapes(kern.cascade, 64), cfg, get("h100"), "bf16").shared_bytes
        if name == "moba":
            assert u["shared_bytes"] <= model <= 1.3 * u["shared_bytes"], (name, cfg, model, u["shared_bytes"])
        else:
            assert model == u["shared_bytes"], (name, cfg, model, u["shared_bytes"])
