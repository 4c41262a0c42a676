"""The frame-distance-profile sweep: long rows of a video transformer's 3D attention with a window, UltraViCo's decay
or a bias table, every provider side by side (:mod:`.profile_providers`), into ``sweep_profiles.csv``.

    vstar-kernels bench --profiles window-16frames ultravico-wan ...   (python -m bench.sweep --profiles ...)

Rows: 4k-16k tokens (16 latent frames of 256-1024 tokens) and Wan-shaped rows at 1x, 2x and 4x its 81 training
frames (21, 42 and 84 latent frames of 390 tokens, Wan at 240 x 416: 8k, 16k and 32k tokens). Each row records the
share of pairs the profile keeps (``kept_share``) beside the ratios to dense SDPA: a window keeping a share f should
cost at most ``1.2 f + 0.05`` of it (``window_target``), a decay or a table what the TAR band costs
(``extension_tar``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from vstar_kernels import FrameProfile
from vstar_kernels.bench.measure import OOM, probe
from vstar_kernels.bench.profile_providers import MATERIALISED_BYTES, PROFILE_PROVIDERS, kept_share, make_profile_case
from vstar_kernels.bench.records import append_csv, run_metadata
from vstar_kernels.bench.timing import time_side_by_side


def _window(frames: int) -> FrameProfile:
    return FrameProfile.window(2, sink_frames=1)


def _wan_window(frames: int) -> FrameProfile:
    return FrameProfile.window(10, sink_frames=1)  # half Wan's 21 training latent frames, its first frame a sink


def _ultravico(frames: int) -> FrameProfile:
    return FrameProfile.decay_beyond(10, 0.9)  # Wan's: FrameProfile.ultravico of a Wan transformer


def _table(frames: int) -> FrameProfile:
    return FrameProfile.table(bias=0.1 * torch.randn(frames, generator=torch.Generator().manual_seed(0),
                                                     dtype=torch.float64))


@dataclass(frozen=True)
class ProfileSeries:
    """Points (latent frames, tokens per frame) of one sequence each, ``heads x head_dim``, and the profile."""

    name: str
    points: tuple[tuple[int, int], ...]
    profile: object  # frames -> FrameProfile
    heads: int = 1
    head_dim: int = 128


SIXTEEN_FRAMES = ((16, 256), (16, 512), (16, 1024))
WAN_LENGTHS = ((21, 390), (42, 390), (84, 390))
PROFILE_SERIES: dict[str, ProfileSeries] = {
    s.name: s
    for s in (
        ProfileSeries("window-16frames", SIXTEEN_FRAMES, _window),
        ProfileSeries("window-wan", WAN_LENGTHS, _wan_window),
        ProfileSeries("ultravico-wan", WAN_LENGTHS, _ultravico),
        ProfileSeries("table-16frames", SIXTEEN_FRAMES, _table),
    )
}
PROFILE_DEFAULT_PROVIDERS = ("sdpa", "sdpa_mask", "naive", "flex", "triton", "extension", "extension_tar")
MATERIALISED_CAP_GIB = 8.0
FLOOR = "sdpa"
PROFILE_CSV_FIELDS = (
    "run_id", "timestamp", "device", "device_name", "vstar_kernels", "torch", "triton", "series", "profile",
    "latent_frames", "tokens_per_frame", "length", "kept_share", "window_target", "dtype", "provider", "status",
    "median_ms", "p20_ms", "p80_ms", "ratio_to_sdpa",
)


def measure_profile_point(series: ProfileSeries, frames: int, per_frame: int, providers: list[str], *, rounds: int,
                          device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Rows for one point: every provider timed side by side (ratios to dense SDPA)."""
    if "flex" in providers:  # a fresh compile per point: dynamo's recompile limit would turn FlexAttention eager
        torch._dynamo.reset()
    profile = series.profile(frames)
    case = make_profile_case(frames, per_frame, series.heads, series.head_dim, profile, dtype=dtype, device=device)
    share = kept_share(profile, frames)
    length = frames * per_frame
    base = {"series": series.name, "profile": repr(profile), "latent_frames": frames, "tokens_per_frame": per_frame,
            "length": length, "kept_share": round(share, 4),
            "window_target": round(1.2 * share + 0.05, 4) if profile.radius is not None else "",
            "dtype": str(dtype).removeprefix("torch.")}
    rows, thunks = {}, {}
    for name in providers:
        provider = PROFILE_PROVIDERS[name]
        reason = provider.unavailable(case)
        gib = length * length * series.heads * MATERIALISED_BYTES.get(name, 0) / 2**30
        if reason is None and gib > MATERIALISED_CAP_GIB:
            reason = f"materialises ~{gib:.0f} GiB (cap {MATERIALISED_CAP_GIB:g} GiB)"
        if reason is not None:
            rows[name] = {**base, "provider": name, "status": f"unavailable: {reason}"}
            continue
        thunk = provider.build(case)
        status = probe(thunk)
        rows[name] = {**base, "provider": name, "status": status}
        if status == "ok":
            thunks[name] = thunk
    times = time_side_by_side(thunks, device=device, rounds=rounds, warmup=1) if thunks else {}
    floor = times[FLOOR].median if FLOOR in times else None
    for name, t in times.items():
        rows[name].update(median_ms=round(t.median, 3), p20_ms=round(t.p20, 3), p80_ms=round(t.p80, 3))
        if floor:
            rows[name]["ratio_to_sdpa"] = round(t.median / floor, 3)
    return [rows[name] for name in providers]


def run_profiles(args: argparse.Namespace) -> Path:
    """Every point of the series in ``args.profiles`` into ``sweep_profiles.csv`` (appended, with the run's
    metadata), a line per point on the console."""
    from rich.console import Console

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    console = Console(stderr=True)
    meta = run_metadata(device)
    csv_path = Path(args.out) / "sweep_profiles.csv"
    providers = [p for p in args.providers if p in PROFILE_PROVIDERS] or list(PROFILE_DEFAULT_PROVIDERS)
    points = [(PROFILE_SERIES[name], point) for name in args.profiles for point in PROFILE_SERIES[name].points]
    for index, (series, (frames, per_frame)) in enumerate(points):
        rows = measure_profile_point(series, frames, per_frame, providers, rounds=args.rounds, device=device,
                                     dtype=dtype)
        append_csv(csv_path, rows, meta, PROFILE_CSV_FIELDS)
        summary = ", ".join(
            f"{r['provider']} {r['ratio_to_sdpa']:.2f}x" if "ratio_to_sdpa" in r else
            f"{r['provider']} {'oom' if r['status'] == OOM else 'n/a'}" for r in rows if r["provider"] != FLOOR)
        console.print(f"[{index + 1}/{len(points)}] {series.name} {frames}x{per_frame} (L={frames * per_frame}, "
                      f"kept {rows[0]['kept_share']:.0%}): {summary}")
    return csv_path
