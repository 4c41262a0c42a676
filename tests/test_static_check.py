"""The static resource check (vstar_kernels.checks.static_check): enumeration coverage, and a fast AOT compile.

The suite runs under TRITON_INTERPRET=1 (conftest.py), where the kernel is an interpreted function that
``triton.compile`` cannot compile; the compiles therefore run in a subprocess without that variable. The suite
compiles one specialisation per kernel family (``--quick``) for sm_80 and sm_90, skipped when it or the full check
passed on the same sources (``--stamp``); the full checks (every specialisation, and every realistic call on
sm_80/86/89/90: about 10 min on 2 quiet cores) are their own steps of .ci/run.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vstar_kernels.backends import triton_tar
from vstar_kernels.backends.triton_tar import block_config
from vstar_kernels.checks import static_check

# long rows of a video transformer run the framed kernels (several key tiles: two-pass relative, or absolute)
FRAMED_VARIANTS = {"relative-2pass+framed", "absolute+framed"}
VARIANTS = {"relative", "relative-2pass", "absolute"} | FRAMED_VARIANTS
TRAINING_VARIANTS = {f"{v}+stats" for v in VARIANTS}  # the forward of a training call saves the row statistics
# the partial results of inference (a Ring's key chunks): a given row max (relative mode only), the lse
PARTIAL_VARIANTS = ({f"{v}{p}" for v in VARIANTS if v.startswith("relative")
                     for p in ("+rowmax", "+lse", "+rowmax+lse")}
                    | {f"{v}+lse" for v in VARIANTS if v.startswith("absolute")})
BACKWARD_KERNELS = {"_tar_bwd_prep", "_tar_bwd_dq", "_tar_bwd_dkdv"}
BACKWARD_VARIANTS = {f"{k}-{m}{f}" for k in ("bwd_prep", "bwd_dq", "bwd_dkdv") for m in ("relative", "absolute")
                     for f in ("", "+framed")}
ROW_MAX_VARIANTS = {"row_max"}  # the row-max kernel (tar_row_max)
ALL_VARIANTS = VARIANTS | PARTIAL_VARIANTS | TRAINING_VARIANTS | BACKWARD_VARIANTS | ROW_MAX_VARIANTS


def _profiled(spec: static_check.Spec) -> bool:
    return spec.variant.endswith("+profile")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def both_classes() -> list[static_check.Spec]:
    """Enumerated once per worker (it takes a while: block_config over every shape): both value classes."""
    return static_check.reachable_specialisations(["plain", "aligned"])


@pytest.fixture(scope="module")
def all_specs(both_classes: list[static_check.Spec]) -> list[static_check.Spec]:
    """The default check's specialisations (value class "plain")."""
    return [s for s in both_classes if s.value_class == "plain"]


@pytest.fixture(scope="module")
def specs(all_specs: list[static_check.Spec]) -> list[static_check.Spec]:
    """The forward kernel's specialisations."""
    return [s for s in all_specs if s.kernel == static_check.FORWARD_KERNEL]


def test_backward_kernels_are_enumerated_for_every_dtype_and_bucket(all_specs: list[static_check.Spec]) -> None:
    assert len(all_specs) == len(set(all_specs))
    assert {s.dtype for s in all_specs if s.kernel in BACKWARD_KERNELS} == {"fp16", "bf16"}
    for dtype in ("fp16", "bf16"):
        for block_d in (32, 64, 128, 256):
            found = {s.variant for s in all_specs if s.kernel in BACKWARD_KERNELS and s.dtype == dtype
                     and s.config.block_d == block_d and not _profiled(s)}
            assert found == BACKWARD_VARIANTS, (dtype, block_d, found)
    for spec in all_specs:
        if spec.kernel in BACKWARD_KERNELS:
            flags = dict(spec.constexprs)
            assert flags["BLOCK_M"] == flags["BLOCK_N"] and "TWO_PASS" not in flags
            assert all(name.startswith("stride_") and name.endswith("d") and value == 1
                       for name, value in spec.specialised)


@pytest.mark.parametrize(("len_k", "head_dim"), [(1, 1), (300, 40), (2048, 256), (65, 129)])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_every_backward_config_is_enumerated(all_specs, len_k: int, head_dim: int, dtype: str) -> None:
    from vstar_kernels.backends.triton_tar_backward import backward_block_config

    cfg = backward_block_config(len_k, head_dim, static_check.DTYPES[dtype])
    tiles = {(s.config.block_m, s.config.block_n, s.config.block_d, s.config.num_warps)
             for s in all_specs if s.dtype == dtype and s.kernel == "_tar_bwd_dkdv"}
    assert (cfg.block_m, cfg.block_n, cfg.block_d, cfg.num_warps) in tiles


def test_enumeration_covers_dtypes_buckets_and_variants(specs: list[static_check.Spec]) -> None:
    assert len(specs) == len(set(specs)), "an identical compile is enumerated twice"
    assert {s.dtype for s in specs} == {"fp16", "bf16", "fp32"}
    assert {s.config.block_d for s in specs} == {32, 64, 128, 256}
    for dtype in ("fp16", "bf16", "fp32"):
        for block_d in (32, 64, 128, 256):
            found = {s.variant for s in specs if s.dtype == dtype and s.config.block_d == block_d and not _profiled(s)}
            expected = VARIANTS | PARTIAL_VARIANTS | (set() if dtype == "fp32" else TRAINING_VARIANTS)  # fp32 trains
            assert found == expected, (dtype, block_d, found)  # via torch


@pytest.fixture(scope="module")
def profile_specs() -> list[static_check.Spec]:
    """``--profiles``' specialisations (value class "plain")."""
    return static_check.reachable_specialisations(["plain"], profiled=True)


def test_profile_kernels_are_enumerated_once_per_family_and_bucket(all_specs: list[static_check.Spec],
                                                                   profile_specs: list[static_check.Spec]) -> None:
    """``--profiles``: a profile's kernels (HAS_BIAS, HAS_SCALE, MASKS all set: the composed profile) for every
    forward and backward variant the launchers run on a GPU, per precision and head_dim bucket exactly one
    specialisation: the largest tile per thread of the family there. Not there: fp32 at the buckets the launcher
    refuses, and the backward at bucket 256 (the torch backward runs). The reachable ones (plain TAR) set no profile
    flag."""
    assert not any(map(_profiled, all_specs))
    for precision, dtypes in (("fp32", {"fp32"}), ("fp16/bf16", {"fp16", "bf16"})):
        for block_d in (32, 64, 128, 256):
            found = [s.variant for s in profile_specs if s.dtype in dtypes and s.config.block_d == block_d]
            expected = {f"{v}+profile" for v in VARIANTS | PARTIAL_VARIANTS}
            if precision != "fp32":  # training: the training forward and the fused backward
                expected |= {f"{v}+profile" for v in TRAINING_VARIANTS}
                expected |= {f"{v}+profile" for v in BACKWARD_VARIANTS} if block_d < 256 else set()
            elif block_d in triton_tar.PROFILE_FP32_SPILLING_BUCKETS:
                expected = set()
            assert sorted(found) == sorted(expected), (precision, block_d)
    for spec in profile_specs:
        flags = dict(spec.constexprs)
        assert flags["HAS_BIAS"] and flags["HAS_SCALE"] and flags["MASKS"]
        assert spec.config.block_m == 16 and spec.config.num_warps >= (8 if spec.config.block_d == 256 else 4)
    plain = [s for s in all_specs if not _profiled(s) and s.kernel != static_check.ROW_MAX_KERNEL]
    assert all(not any(dict(s.constexprs)[f] for f in ("HAS_BIAS", "HAS_SCALE", "MASKS")) for s in plain)


@pytest.fixture(scope="module")
def every_profile_compile() -> set[tuple[str, str, object]]:
    """(dtype, variant, tiles) of every profile compile the enumeration finds, before the per-bucket reduction."""
    return {(s.dtype, s.variant, s.config) for s in static_check._enumerate(["plain"], profiled=True)}


@pytest.mark.parametrize(("len_k", "head_dim"), [(1, 40), (100, 40), (300, 64), (2048, 100), (65, 200), (14, 256)])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("framed", [False, True])
def test_the_launchers_run_the_enumerated_profile_tiles(every_profile_compile, len_k: int, head_dim: int, mode: str,
                                                        dtype: str, framed: bool) -> None:
    """What runs is what ``--profiles`` compiles: the launchers themselves (forward with and without the partial
    results, the training forward, the fused backward) called on meta tensors with a profile, their kernels
    recorded; every launch's tiles and variant are among the enumeration's, and they are the profile tiles (16 query
    rows, at least 4 warps), not the plain ones. Framed: long rows, as the enumeration has them."""
    from vstar_kernels.backends import triton_tar, triton_tar_backward
    from vstar_kernels.contract import make_params

    torch_dtype = static_check.DTYPES[dtype]
    heads = 3
    if framed:  # long rows run the framed kernels (the enumeration's LONG_ROW: their tiles do not depend on it)
        len_k = static_check.LONG_ROW
    layout = static_check.FRAMED_LAYOUT if framed else {}
    params = make_params(head_dim, profile=static_check.composed_profile(heads, 1.0, mode), **layout)
    q, k = (torch.empty((2, n, heads, head_dim), dtype=torch_dtype, device="meta") for n in (len_k, len_k))
    rows = torch.empty((2, len_k, heads), dtype=torch.float32, device="meta")
    launched = []
    with static_check._recording_kernels() as calls:
        triton_tar.forward(q, k, k, params)
        triton_tar.forward(q, k, k, params, return_lse=True)
        triton_tar.forward(q, k, k, params, row_max=rows, return_lse=True)
        if dtype != "fp32":  # fp32 trains through torch
            triton_tar.training_forward(q, k, k, params)
            stats = torch.empty((2, 2 * heads, len_k), dtype=torch.float32, device="meta")
            triton_tar_backward.backward(q, k, k, q, params, residuals=(q, stats))
        launched = [static_check._spec_from_call(dtype, "plain", *call) for call in calls]
    assert len(launched) == (3 if dtype == "fp32" else 7)
    for spec in launched:
        assert (spec.dtype, spec.variant, spec.config) in every_profile_compile, spec
        assert spec.config.block_m == 16 and spec.config.num_warps >= 4


def test_value_classes_differ_only_in_int_hints(both_classes: list[static_check.Spec]) -> None:
    both = [s for s in both_classes if s.kernel == static_check.FORWARD_KERNEL]
    plain = [s for s in both if s.value_class == "plain"]
    aligned = [s for s in both if s.value_class == "aligned"]
    assert len(plain) == len(aligned) == len(both) // 2
    ints = {"num_heads", "len_q", "len_k", "head_dim"}
    assert all(not ints & set(s.divisible) for s in plain)
    assert all(ints <= set(s.divisible) for s in aligned)


@pytest.mark.parametrize(("len_q", "len_k", "head_dim"), [(1, 1, 1), (16, 300, 40), (2048, 2048, 256), (7, 65, 129)])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_every_row_max_config_is_enumerated(all_specs: list[static_check.Spec], len_q: int, len_k: int,
                                            head_dim: int, dtype: str) -> None:
    """triton_tar.row_max (ops.tar_row_max on the Triton backend) runs row_max_block_config's tiles."""
    from vstar_kernels.backends.triton_tar import row_max_block_config

    del len_q
    cfg = row_max_block_config(len_k, head_dim, static_check.DTYPES[dtype])
    tiles = {(s.config.block_m, s.config.block_n, s.config.block_d, s.config.num_warps)
             for s in all_specs if s.dtype == dtype and s.kernel == static_check.ROW_MAX_KERNEL}
    assert (cfg.block_m, cfg.block_n, cfg.block_d, cfg.num_warps) in tiles
    assert {s.variant for s in all_specs if s.kernel == static_check.ROW_MAX_KERNEL} == ROW_MAX_VARIANTS


def test_enumeration_matches_launch_flags(specs: list[static_check.Spec]) -> None:
    for spec in specs:
        flags = dict(spec.constexprs)
        assert spec.config.two_pass == flags["TWO_PASS"]
        assert (flags["BLOCK_M"], flags["BLOCK_N"], flags["BLOCK_D"]) == (
            spec.config.block_m, spec.config.block_n, spec.config.block_d)
        assert flags["DOT_PRECISION"] == ("ieee" if spec.dtype == "fp32" else "tf32")
        assert dict(spec.specialised) == {f"stride_{t}d": 1 for t in "qkvo"}  # contiguous last dim


@pytest.mark.parametrize(("len_q", "len_k", "head_dim"), [(1, 1, 1), (16, 300, 40), (2048, 2048, 256), (7, 65, 129)])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_every_block_config_is_enumerated(specs: list[static_check.Spec], len_q: int, len_k: int, head_dim: int,
                                          mode: str, dtype: str) -> None:
    cfg = block_config(len_q, len_k, head_dim, mode, static_check.DTYPES[dtype])
    tiles = {(s.config.block_m, s.config.block_n, s.config.block_d, s.config.num_warps, s.config.two_pass)
             for s in specs if s.dtype == dtype}
    assert (cfg.block_m, cfg.block_n, cfg.block_d, cfg.num_warps, cfg.two_pass) in tiles


@pytest.mark.parametrize(("len_k", "head_dim"), [(1, 1), (16, 40), (300, 40), (2048, 256), (65, 129)])
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_every_training_forward_config_is_enumerated(specs, len_k: int, head_dim: int, mode: str, dtype: str) -> None:
    from vstar_kernels.backends.triton_tar_backward import training_block_config

    cfg = training_block_config(block_config(len_k, len_k, head_dim, mode, static_check.DTYPES[dtype]))
    tiles = {(s.config.block_m, s.config.block_n, s.config.block_d, s.config.num_warps, s.config.two_pass)
             for s in specs if s.dtype == dtype and s.variant.endswith("+stats")}
    assert (cfg.block_m, cfg.block_n, cfg.block_d, cfg.num_warps, cfg.two_pass) in tiles


def test_value_specialisation_matches_triton() -> None:
    """specialise_value reproduces triton's own rule (ints == 1 constexpr, multiples of 16 divisible, ...)."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    native = getattr(libtriton, "native_specialize_impl", None)
    if native is None:
        pytest.skip("this triton has no native_specialize_impl")
    from triton.backends.compiler import BaseBackend

    values = [1, 0, 16, 40, 100, 480, 48000, 2**31, 2.5, static_check._representative_tensor(torch.bfloat16)]
    for value in values:
        ty, const, divisible = static_check.specialise_value(value)
        expected_ty, expected_attr = native(BaseBackend, value, False, True, True)
        assert ty == expected_ty, value
        if ty == "constexpr":
            assert const == expected_attr
        else:
            assert divisible == (expected_attr == "D"), value


def test_refuses_under_the_interpreter(capsys: pytest.CaptureFixture[str]) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    assert static_check.main([]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_quick_check_picks_the_largest_tile_of_every_kernel_family(all_specs: list[static_check.Spec]) -> None:
    quick = static_check.quick_specialisations(all_specs)
    families = {static_check.kernel_family(s) for s in all_specs}
    assert sorted(map(static_check.kernel_family, quick)) == sorted(families)  # each family once
    assert sorted(quick, key=all_specs.index) == quick  # in the enumeration's order
    assert {kernel for kernel, _, _ in families} == set(static_check.KERNELS)
    assert {variant for _, variant, _ in families} == ALL_VARIANTS
    assert 40 <= len(quick) <= 60 < len(all_specs)
    for spec in quick:
        family = [s for s in all_specs if static_check.kernel_family(s) == static_check.kernel_family(spec)]
        assert static_check._tile_per_thread(spec) == max(map(static_check._tile_per_thread, family))


def _compile_check(*args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``static_check ARGS --csv`` without TRITON_INTERPRET, into a fresh triton cache; the process and its rows."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    table = tmp_path / "rows.csv"
    proc = subprocess.run([sys.executable, "-m", "vstar_kernels.checks.static_check", *args, "--csv", str(table)],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=1200)
    if proc.returncode == 2:
        pytest.skip(f"static check cannot run here: {proc.stderr.strip()}")
    if proc.returncode == 0 and "--stamp" in args and proc.stdout.rstrip().endswith("; skipped"):
        pytest.skip(proc.stdout.strip())  # it (or the full check, a superset) passed on these sources: see --stamp
    with table.open() as handle:
        return proc, list(csv.DictReader(handle))


def test_every_kernel_family_compiles_without_spills(tmp_path: Path) -> None:
    """``static_check --quick``: one specialisation per kernel family (kernel, variant, precision), sm_80 and sm_90,
    judged by every rule of the full check (no compile error, spill, local memory, ...). The full check of every
    specialisation is a .ci/run step. With ``--stamp``: skipped when this check, or the full one (its rows include
    these), passed on the same kernel sources, triton and torch, e.g. in .ci/run's full-check step just before."""
    proc, rows = _compile_check("--quick", "--stamp", tmp_path=tmp_path)
    failing = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0, "\n".join(failing) or proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernel families, one specialisation each" in proc.stdout
    assert {row["arch"] for row in rows} == {"sm_80", "sm_90"}
    assert {row["variant"] for row in rows} == ALL_VARIANTS
    assert all(row["status"] == "ok" and row["spill_st"] == row["spill_ld"] == row["local"] == "0" for row in rows)


def test_stamp_skips_a_passed_check_until_a_kernel_source_changes(monkeypatch, tmp_path: Path, capsys) -> None:
    """--stamp (the .ci/run steps): a pass writes a stamp keyed by the kernel sources, triton, torch and the
    options; the same check then skips, and any change to those runs it again. A full pass also covers --quick with
    the same options (a subset of its rows), not the reverse. No compile: run_all is stubbed."""
    monkeypatch.setenv("VSTAR_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(static_check, "toolchain_problem", lambda: None)
    compiled: list[int] = []
    result = {"failing": False}

    def fake_run_all(specs, archs, jobs, cache_dir):
        compiled.append(len(specs) * len(archs))
        usage = static_check.Usage(64, 0, 1024, 0, 0, 8 if result["failing"] else 0, 0, 64)
        return [static_check.Row(arch, spec, usage) for arch in archs for spec in specs]

    monkeypatch.setattr(static_check, "run_all", fake_run_all)
    args = ["--realistic", "--quick", "--stamp", "--arch", "80"]
    result["failing"] = True
    assert static_check.main(args) == 1 and len(compiled) == 1  # a failing run leaves no stamp
    result["failing"] = False
    assert static_check.main(args) == 0 and len(compiled) == 2
    assert "stamp written" in capsys.readouterr().out
    assert static_check.main(args) == 0 and len(compiled) == 2  # skipped
    assert "skipped" in capsys.readouterr().out
    assert static_check.main([*args[:-1], "90"]) == 0 and len(compiled) == 3  # other options: their own stamp
    assert static_check.main([*args, "--jobs", "1"]) == 0 and len(compiled) == 3  # --jobs changes no result
    full = [arg for arg in args if arg != "--quick"]
    assert static_check.main(full) == 0 and len(compiled) == 4  # a quick pass does not cover the full check
    capsys.readouterr()
    assert static_check.main([*full[:-1], "86"]) == 0 and len(compiled) == 5
    assert static_check.main([*args[:-1], "86"]) == 0 and len(compiled) == 5  # the full pass covers the quick one
    assert "the full check passed before" in capsys.readouterr().out
    source = static_check.kernel_source_files()[0]
    real_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: real_bytes(p) + (b"# edited" if p == source else b""))
    assert static_check.main(args) == 0 and len(compiled) == 6  # a kernel source changed: compiled again
    assert {p.name for p in static_check.kernel_source_files()} >= {"triton_tar.py", "triton_tar_backward.py",
                                                                   "triton_common.py", "contract.py", "static_check.py"}


# ------------------------------------------------------------------------------------------------ realistic calls
@pytest.fixture(scope="module")
def realistic() -> dict[static_check.Spec, list[str]]:
    return static_check.realistic_specialisations()


def test_realistic_calls_are_all_enumerated(realistic: dict[static_check.Spec, list[str]]) -> None:
    labels = [label for calls in realistic.values() for label in calls]
    shapes = sum(len(s) for s in static_check.REALISTIC_MODELS.values())
    temporal = shapes * len(static_check.REALISTIC_FRAMES) * len(static_check.LAYOUTS) * len(static_check.DTYPES) * 2
    dit = len(static_check.REALISTIC_DIT) * len(static_check.DTYPES) * 2
    ring = len(static_check.REALISTIC_DIT) * len(static_check.DTYPES) * 3  # a key chunk per mode, the row-max pass
    text_last = sum(text > 0 and not first for *_, text, first in static_check.REALISTIC_DIT.values())
    varlen = text_last * len(static_check.DTYPES) * 2  # HunyuanVideo's text mask: varlen keys, both modes
    assert len(labels) == len(set(labels)) == temporal + dit + ring + varlen
    assert any(dict(spec.constexprs)["VARLEN"] for spec in realistic if spec.kernel == static_check.FORWARD_KERNEL)
    framed = {label for spec, calls in realistic.items() if "framed" in spec.variant for label in calls}
    assert framed == {label for label in labels if " L=" in label}  # every DiT call runs the framed kernels
    assert {spec.value_class for spec in realistic} == {static_check.REALISTIC}
    assert any("animatediff 8x40 F=25 fused_qkv fp16 relative" in calls for calls in realistic.values())


def test_realistic_layouts_are_16_byte_aligned(realistic: dict[static_check.Spec, list[str]]) -> None:
    """Every realistic call passes ALIGN = elements per 16 bytes: its rows start 16-byte aligned, so the SASS rule
    against 16-bit global accesses applies to all of them."""
    for spec in realistic:
        assert dict(spec.constexprs)["ALIGN"] == (4 if spec.dtype == "fp32" else 8), spec


def test_realistic_tensors_have_the_strides_of_real_calls() -> None:
    q, k, v, out = static_check.realistic_tensors("fused_qkv", 25, 8, 40, torch.float16)
    assert q.stride() == k.stride() == v.stride() == (25 * 960, 960, 40, 1)
    assert k.data_ptr() - q.data_ptr() == 320 * 2 and out.is_contiguous()
    q, k, _, _ = static_check.realistic_tensors("projection", 16, 5, 64, torch.float32)
    assert q.stride() == k.stride() == (16 * 320, 320, 64, 1)


def test_sass_profile_counts_the_judged_instructions() -> None:
    sass = """
        /*0100*/ LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0110*/ STG.E.U16 desc[UR4][R6.64], R9 ;
        /*0120*/ LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0130*/ LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0140*/ STG.E.128 desc[UR4][R6.64], R8 ;
        /*0150*/ LDG.E.64 R10, desc[UR4][R2.64] ;
        /*0160*/ HMMA.16816.F32 R12, R4, R8, R12 ;
        /*0170*/ HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;
        /*0180*/ LDS.U16 R1, [R2] ;
        /*0190*/ STL [R1], R2 ;
    """
    expected = static_check.SassProfile(narrow_global=2, wide_global=3, mma=2, local=1, wgmma=1)
    assert static_check.sass_profile(sass) == expected


@pytest.mark.parametrize(("regs", "shared", "warps", "arch", "expected"), [
    (64, 0, 2, 80, 32),  # block slots: 32 blocks x 2 warps
    (255, 0, 4, 80, 8),  # registers: 256 x 32 per warp -> 8 warps
    (134, 45056, 4, 86, 8),  # shared: 100 KB / 46 KB -> 2 blocks
    (134, 45056, 4, 80, 12),  # registers: 136 x 32 = 4352 per warp -> 15 warps -> 3 blocks
    (64, 33856, 16, 86, 32),  # warp slots: 48 / 16 -> 3 blocks, shared -> 2 blocks
])
def test_occupancy_model(regs: int, shared: int, warps: int, arch: int, expected: int) -> None:
    assert static_check.warps_per_sm(regs, shared, warps, arch) == expected


def test_sass_rules(realistic: dict[static_check.Spec, list[str]], all_specs: list[static_check.Spec]) -> None:
    spec = next(s for s in realistic if s.dtype == "fp16")
    good = static_check.SassProfile(narrow_global=0, wide_global=4, mma=8, local=0)
    usage = static_check.Usage(100, 0, 1024, 0, 0, 0, 0, 100, good, 16)

    def problems(warps: int = 16, spec: static_check.Spec = spec, **sass: int) -> list[str]:
        changed = dataclasses.replace(usage, sass=dataclasses.replace(good, **sass), warps_per_sm=warps)
        return static_check.Row(80, spec, changed).problems()

    assert problems() == []
    assert "16-bit" in problems(narrow_global=2)[0]
    assert "local" in problems(local=1)[0]
    assert "HMMA" in problems(mma=0)[0]
    assert "warps per SM" in problems(warps=8)[0]
    plain = next(s for s in all_specs if s.dtype == "fp16")
    assert problems(warps=8, spec=plain) == []  # occupancy is judged on realistic calls only


def test_kernels_leave_the_layout_and_offset_integers_unspecialised() -> None:
    """The enumeration types NOT_SPECIALIZED arguments as plain ints (no constexpr 1, no divisibility hint), which is
    true only if every compiled kernel declares exactly that list."""
    code = ("from vstar_kernels.backends import triton_tar as t, triton_tar_backward as b\n"
            "names = [k.do_not_specialize for k in (t._tar_attention_fwd, t._tar_row_max, b._tar_bwd_prep, "
            "b._tar_bwd_dq, b._tar_bwd_dkdv)]\nassert all(list(n) == t.NOT_SPECIALIZED for n in names), names")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
