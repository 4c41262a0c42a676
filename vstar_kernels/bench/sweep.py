"""The benchmark sweep: every TAR provider available on the device, side by side, over real temporal-attention shapes.

    vstar-kernels bench [--shapes ...] [--frames 16 ... 512] [--providers ...] [--modes relative absolute]
                        [--tokens 8192] [--rounds 10] [--memory first|all|none] [--out bench-results]
    vstar-kernels bench --dit dit-d128-16frames ...   (long rows: a video transformer's 3D attention, 4k-32k tokens)
    python -m bench.sweep ...        (in the repository: the same options, writing into bench/results)

Per point (shape, frames, mode) the available providers are timed in the same interleaved rounds (median, p20, p80;
ratio to plain SDPA without bias). Peak memory: CUDA allocator peak, or on the CPU the resident-set growth of a fresh
subprocess per provider. A provider that runs out of memory is recorded as ``oom``; one that cannot express the point
says why (FlexAttention has no relative mode). Beside each row: the analytic minimum bytes (q, k, v, o once) and
FLOPs, and on CUDA the achieved bandwidth as a share of the device's peak. Rows are appended to ``sweep.csv`` with
device, versions and a timestamp; ``sweep_time_<device>.png`` and ``sweep_memory_<device>.png`` plot the latest run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vstar_kernels.bench.measure import OOM, failure_status, peak_in_process, probe, run_child
from vstar_kernels.bench.profile_providers import PROFILE_PROVIDERS
from vstar_kernels.bench.profile_sweep import PROFILE_DEFAULT_PROVIDERS, PROFILE_SERIES, run_profiles
from vstar_kernels.bench.providers import FLEX_COMPILE_ENV, PROVIDERS, flex_compiled, forward_backward, make_case
from vstar_kernels.bench.records import CSV_FIELDS, append_csv, run_metadata
from vstar_kernels.bench.timing import time_side_by_side


@dataclass(frozen=True)
class Shape:
    """The temporal attention of one model family: heads x head_dim."""

    name: str
    heads: int
    head_dim: int


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("modelscope-h5-d64", 5, 64),
        Shape("modelscope-h10-d64", 10, 64),
        Shape("modelscope-h20-d64", 20, 64),
        Shape("animatediff-h8-d40", 8, 40),
        Shape("animatediff-h8-d80", 8, 80),
        Shape("animatediff-h8-d160", 8, 160),
    )
}
DEFAULT_FRAMES = (16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class DiTSeries:
    """Long rows of a video transformer's 3D attention: one sequence of ``frames x tokens_per_frame`` tokens per
    point, ``heads x head_dim`` (one Wan-sized head: 128 channels; a CPU sweep of 32k tokens needs minutes per head)."""

    name: str
    heads: int
    head_dim: int
    points: tuple[tuple[int, int], ...]  # (latent frames, tokens per frame)
    sigma: float = 2.0


DIT_SERIES: dict[str, DiTSeries] = {
    s.name: s
    for s in (
        DiTSeries("dit-d128-16frames", 1, 128, ((16, 256), (16, 512), (16, 1024), (16, 2048))),
        DiTSeries("dit-d128-2048perframe", 1, 128, ((1, 2048), (2, 2048), (4, 2048), (8, 2048), (16, 2048))),
        DiTSeries("dit-d128-16frames-sigma0.5", 1, 128, ((16, 256), (16, 512), (16, 1024), (16, 2048)), sigma=0.5),
    )
}
# Providers that materialise Lq x Lk tensors are skipped beyond this estimate (a 2-core, 24 GiB machine)
MATERIALISED_CAP_GIB = 8.0
# bytes per Lq x Lk element: the naive reference (fp32 scores, biased scores, probabilities, plus the float64 band it
# builds), SDPA with a materialised bias (the float64 band, the fp32 bias and, relative, the fp32 scores for the max)
MATERIALISED_BYTES = {"naive": 36, "sdpa_bias": 32}
FLOOR = "sdpa"
# The long-row sweep leaves out by default the torch fallback (memory-bounded, not fast: ~10x SDPA at 8k tokens) and
# FlexAttention on the CPU (a compile per length, then ~7-9x SDPA at 4k-8k tokens); --providers adds them
DIT_PROVIDERS = ("sdpa", "naive", "sdpa_bias", "xformers", "triton", "extension")
# the long-row sweep (sweep_dit.csv): "frames" holds the sequence length L, plus the layout, the band and the share of
# key tiles whose bias the Triton kernel skips in fp16 (modelled: band_tiles_skipped)
DIT_CSV_FIELDS = (*CSV_FIELDS, "latent_frames", "tokens_per_frame", "sigma", "triton_band_tiles_skipped")


def device_peak_bandwidth_gbs(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth (GB/s) of a CUDA device from its memory clock and bus width, if torch has them."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate


def analytic(batch: int, frames: int, heads: int, head_dim: int, dtype: torch.dtype) -> tuple[int, float]:
    """Minimum bytes moved (q, k, v read and o written once) and GFLOP (QK^T and PV) of one call."""
    elements = batch * frames * heads * head_dim
    min_bytes = 4 * elements * torch.empty((), dtype=dtype).element_size()
    gflop = 4 * batch * heads * frames * frames * head_dim / 1e9
    return min_bytes, gflop


def _child(payload: dict) -> dict:
    """Subprocess entry (CPU memory): build the point, run the provider once, report the RSS growth."""
    backward = payload.get("backward", False)
    case = make_case(payload["tokens"], payload["frames"], payload["heads"], payload["head_dim"], payload["mode"],
                     requires_grad=backward, sigma=payload.get("sigma", 8.0),
                     tokens_per_frame=payload.get("tokens_per_frame", 1))
    thunk = _thunk(PROVIDERS[payload["provider"]], case, backward)
    try:
        return {"status": "ok", "peak_mib": round(peak_in_process(thunk, case.q.device), 1)}
    except Exception as exc:  # reported, not raised: the parent records it
        return {"status": failure_status(exc)}


def _thunk(provider, case, backward: bool):
    forward = provider.build(case)
    return forward_backward(forward, case) if backward else forward


def measure_point(shape: Shape, frames: int, mode: str, providers: list[str], *, tokens: int, rounds: int,
                  device: torch.device, dtype: torch.dtype, memory: bool, backward: bool = False,
                  tokens_per_frame: int = 1, sigma: float = 8.0) -> list[dict]:
    """Rows for one (shape, frames, mode): every provider timed side by side, with memory when asked; with
    ``backward``, forward plus the backward to q, k and v. ``tokens_per_frame`` > 1: one video transformer sequence of
    ``frames`` tokens (pass ``tokens == frames``); providers that materialise it beyond MATERIALISED_CAP_GIB are
    skipped."""
    case = make_case(tokens, frames, shape.heads, shape.head_dim, mode, dtype=dtype, device=device,
                     requires_grad=backward, sigma=sigma, tokens_per_frame=tokens_per_frame)
    batch = case.q.shape[0]
    min_bytes, gflop = analytic(batch, frames, shape.heads, shape.head_dim, dtype)
    base = {"shape": shape.name, "heads": shape.heads, "head_dim": shape.head_dim, "batch": batch, "frames": frames,
            "mode": mode, "dtype": str(dtype).removeprefix("torch."), "min_bytes": min_bytes, "gflop": round(gflop, 4)}
    rows: dict[str, dict] = {}
    thunks = {}
    for name in providers:
        provider = PROVIDERS[name]
        reason = provider.unavailable(case) or _over_cap(name, case, tokens_per_frame)
        if reason is not None:
            rows[name] = {**base, "provider": name, "status": f"unavailable: {reason}"}
            continue
        thunk = _thunk(provider, case, backward)
        status = probe(thunk)
        rows[name] = {**base, "provider": name, "status": status}
        if status == "ok":
            thunks[name] = thunk
    times = time_side_by_side(thunks, device=device, rounds=rounds) if thunks else {}
    floor = times[FLOOR].median if FLOOR in times else None
    peak_bw = device_peak_bandwidth_gbs(device)
    for name, t in times.items():
        row = rows[name]
        row.update(median_ms=round(t.median, 4), p20_ms=round(t.p20, 4), p80_ms=round(t.p80, 4))
        if floor:
            row["ratio_to_sdpa"] = round(t.median / floor, 3)
        achieved = min_bytes / (t.median / 1e3) / 1e9
        row["achieved_gbs"] = round(achieved, 2)
        if peak_bw:
            row["bandwidth_share"] = round(achieved / peak_bw, 4)
    if memory:
        for name in list(thunks):
            if device.type == "cuda":
                rows[name]["peak_mib"] = round(peak_in_process(thunks[name], device), 1)
            else:
                payload = {"tokens": tokens, "frames": frames, "heads": shape.heads, "head_dim": shape.head_dim,
                           "mode": mode, "provider": name, "backward": backward, "sigma": sigma,
                           "tokens_per_frame": tokens_per_frame}
                result = run_child("vstar_kernels.bench.sweep", payload)
                if result["status"] == "ok":
                    rows[name]["peak_mib"] = result["peak_mib"]
                else:
                    rows[name]["status"] = result["status"]
    # providers that ran out of memory before timing still get a row; memory of a failed probe stays empty
    return [rows[name] for name in providers]


def _over_cap(name: str, case, tokens_per_frame: int) -> str | None:
    """Why a materialising provider is skipped at a long-row point (None: it runs)."""
    if tokens_per_frame == 1 or name not in MATERIALISED_BYTES:
        return None
    elements = case.q.shape[0] * case.q.shape[2] * case.q.shape[1] * case.k.shape[1]
    gib = elements * MATERIALISED_BYTES[name] / 2**30
    return f"materialises ~{gib:.0f} GiB (cap {MATERIALISED_CAP_GIB:g} GiB)" if gib > MATERIALISED_CAP_GIB else None


def run_dit(args: argparse.Namespace) -> Path:
    """The long-row sweep: each DiT series point (latent frames x tokens per frame) with every provider, side by
    side, into ``sweep_dit.csv`` and ``sweep_dit_{time,memory}_<device>.png``."""
    from rich.console import Console
    from rich.progress import track

    from vstar_kernels.backends.triton_tar import band_tiles_skipped

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    console = Console(stderr=True)
    meta = run_metadata(device)
    out = Path(args.out)
    csv_path = out / "sweep_dit.csv"
    points = [(DIT_SERIES[name], point, mode) for name in args.dit for mode in args.modes
              for point in DIT_SERIES[name].points]
    _note_eager_flex(args, console)
    for index, (series, (latent, per_frame), mode) in enumerate(track(points, description="dit sweep",
                                                                      console=console)):
        length = latent * per_frame
        shape = Shape(series.name, series.heads, series.head_dim)
        memory = args.memory == "all" or (args.memory == "first" and series.name == args.dit[0])
        rows = measure_point(shape, length, mode, args.providers, tokens=length, rounds=args.rounds, device=device,
                             dtype=dtype, memory=memory, tokens_per_frame=per_frame, sigma=series.sigma)
        # modelled for the GPU's half precision (fp32 keeps one biased loop)
        skipped = band_tiles_skipped(length, per_frame, series.sigma, series.head_dim, mode, torch.float16)
        for row in rows:
            row.update(latent_frames=latent, tokens_per_frame=per_frame, sigma=series.sigma,
                       triton_band_tiles_skipped=round(skipped, 4))
        append_csv(csv_path, rows, meta, DIT_CSV_FIELDS)
        summary = ", ".join(
            f"{r['provider']} {r['ratio_to_sdpa']:.2f}x" if "ratio_to_sdpa" in r else f"{r['provider']} "
            f"{'oom' if r['status'] == OOM else 'n/a'}" for r in rows if r["provider"] != FLOOR)
        floor = next((r.get("median_ms") for r in rows if r["provider"] == FLOOR), None)
        console.print(f"[{index + 1}/{len(points)}] {series.name} {latent}x{per_frame} (L={length}) {mode}: "
                      f"sdpa {floor} ms; {summary}; triton skips {skipped:.0%} of key tiles")
    if not args.no_plot:
        from vstar_kernels.bench.plots import plot_sweep

        for png in plot_sweep(csv_path, meta["run_id"], out, prefix="sweep_dit"):
            console.print(f"wrote {png}")
    return csv_path


def _note_eager_flex(args: argparse.Namespace, console) -> None:
    if {"flex", "flex_two_pass"} & set(args.providers) and not flex_compiled():
        console.print(f"FlexAttention runs eagerly ({FLEX_COMPILE_ENV}=0): its times are not the compiled kernel's")


def run(args: argparse.Namespace) -> Path:
    from rich.console import Console
    from rich.progress import track

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    console = Console(stderr=True)
    meta = run_metadata(device)
    out = Path(args.out)
    csv_path = out / ("sweep_backward.csv" if args.backward else "sweep.csv")
    points = [(SHAPES[s], f, m) for s in args.shapes for m in args.modes for f in args.frames]
    _note_eager_flex(args, console)
    all_rows: list[dict] = []
    for index, (shape, frames, mode) in enumerate(track(points, description="sweep", console=console)):
        memory = args.memory == "all" or (args.memory == "first" and shape.name == args.shapes[0])
        rows = measure_point(shape, frames, mode, args.providers, tokens=args.tokens, rounds=args.rounds,
                             device=device, dtype=dtype, memory=memory, backward=args.backward)
        append_csv(csv_path, rows, meta)
        all_rows += rows
        floor = next((r.get("median_ms") for r in rows if r["provider"] == FLOOR), None)
        summary = ", ".join(
            f"{r['provider']} {r['ratio_to_sdpa']:.2f}x" if "ratio_to_sdpa" in r else f"{r['provider']} "
            f"{'oom' if r['status'] == OOM else 'n/a'}" for r in rows if r["provider"] != FLOOR)
        console.print(f"[{index + 1}/{len(points)}] {shape.name} F={frames} {mode}: sdpa {floor} ms; {summary}")
    if not args.no_plot:
        from vstar_kernels.bench.plots import plot_sweep

        for png in plot_sweep(csv_path, meta["run_id"], out, prefix="sweep_backward" if args.backward else "sweep"):
            console.print(f"wrote {png}")
    console.print(f"appended {len(all_rows)} rows to {csv_path} (run {meta['run_id']})")
    return csv_path


DEFAULT_OUT = Path("bench-results")


DEFAULT_TOKENS = 8192
DEFAULT_ROUNDS = 10
# What a run costs, shown by --help: measured on 2 quiet cores (AMD EPYC, AVX512), torch 2.13.0+cpu, fp32
DEFAULT_RUN_TIME = "15 min"
QUICK_RUN_TIME = "45 s"
HELP_EPILOG = f"""\
size: the defaults are {len(SHAPES)} shapes x {len(DEFAULT_FRAMES)} frame counts x 2 modes = \
{len(SHAPES) * len(DEFAULT_FRAMES) * 2} points
of {DEFAULT_TOKENS} tokens (batch = tokens / frames). Each point times every provider
available on the device side by side for {DEFAULT_ROUNDS} rounds (FlexAttention compiled
once per absolute-mode point); the first shape's points also measure peak
memory, in a subprocess per provider. On 2 CPU cores (fp32) a default run
takes about {DEFAULT_RUN_TIME}.
A quick look, about {QUICK_RUN_TIME}:
  vstar-kernels bench --shapes animatediff-h8-d40 --frames 16 128 \\
      --providers sdpa naive extension --rounds 3
"""


def build_parser(parser: argparse.ArgumentParser | None = None, default_out: Path = DEFAULT_OUT
                 ) -> argparse.ArgumentParser:
    """The sweep's options; ``vstar-kernels bench`` adds them to its subcommand parser. The help gives every
    default and what a default run costs."""
    parser = parser or argparse.ArgumentParser(prog="python -m bench.sweep")
    parser.description = __doc__.split("\n\n")[0].split("\n")[0]
    parser.epilog = HELP_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), metavar="SHAPE",
                        help=f"temporal-attention shapes, heads x head_dim: {', '.join(SHAPES)} (default: all)")
    parser.add_argument("--frames", type=int, nargs="+", default=list(DEFAULT_FRAMES), metavar="F",
                        help=f"frame counts (default: {' '.join(map(str, DEFAULT_FRAMES))})")
    parser.add_argument("--providers", nargs="+", choices=sorted({*PROVIDERS, *PROFILE_PROVIDERS}), default=None,
                        metavar="PROVIDER",
                        help=f"{', '.join(PROVIDERS)} (default: all, those the device cannot run say why; "
                             f"--dit: {' '.join(DIT_PROVIDERS)})")
    parser.add_argument("--modes", nargs="+", choices=["relative", "absolute"], default=["relative", "absolute"],
                        help="TAR modes (default: relative absolute)")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"batch*frames per point, B*H*W*F of a latent (default: {DEFAULT_TOKENS})")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"interleaved timing rounds per point, reported as median/p20/p80 (default: "
                             f"{DEFAULT_ROUNDS})")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="(default: float32 on CPU, float16 on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="(default: cuda when available, else cpu)")
    parser.add_argument("--memory", choices=["first", "all", "none"], default="first",
                        help="measure peak memory for the first shape only, every shape, or none (default: first)")
    parser.add_argument("--out", default=str(default_out), help=f"output folder (default: {default_out})")
    parser.add_argument("--backward", action="store_true",
                        help="time forward + backward (gradients of q, k, v, as in training) into sweep_backward.csv")
    parser.add_argument("--dit", nargs="+", choices=list(DIT_SERIES), default=None, metavar="SERIES",
                        help=f"the long-row sweep instead: video-transformer 3D attention series, "
                             f"{', '.join(DIT_SERIES)} (sweep_dit.csv; default: off)")
    parser.add_argument("--profiles", nargs="+", choices=list(PROFILE_SERIES), default=None, metavar="SERIES",
                        help=f"the frame-distance-profile sweep instead: long rows with a window, UltraViCo's decay "
                             f"or a table, {', '.join(PROFILE_SERIES)} (sweep_profiles.csv; providers "
                             f"{' '.join(PROFILE_PROVIDERS)}; default: off)")
    parser.add_argument("--no-plot", action="store_true", help="write the CSV only (no matplotlib needed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def missing_modules(args: argparse.Namespace) -> list[str]:
    """The bench extra's modules this run needs that are not installed: rich always, matplotlib unless
    ``--no-plot``. Checked before any work (an import error after the sweep would lose it)."""
    from vstar_kernels.extras import missing_modules as absent

    return absent(["rich", *([] if args.no_plot else ["matplotlib"])])


MISSING_EXTRA = "the sweep needs {names}, not installed: pip install 'vstar-kernels[bench]'"


def run_from_args(args: argparse.Namespace) -> int:
    """Validate the parsed options and run the sweep; bad options exit with a one-line message."""
    if min(args.frames) < 1 or args.tokens < 1 or args.rounds < 1:
        raise SystemExit("error: --frames, --tokens and --rounds must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    missing = missing_modules(args)
    if missing:
        raise SystemExit("error: " + MISSING_EXTRA.format(names=" and ".join(missing)))
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    if args.profiles:
        args.providers = args.providers or list(PROFILE_DEFAULT_PROVIDERS)
        run_profiles(args)
        return 0
    args.providers = args.providers or list(DIT_PROVIDERS if args.dit else PROVIDERS)
    if args.dit:
        run_dit(args)
    else:
        run(args)
    return 0


def main(argv: list[str] | None = None, default_out: Path = DEFAULT_OUT) -> int:
    args = build_parser(default_out=default_out).parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    return run_from_args(args)


if __name__ == "__main__":
    raise SystemExit(main())
