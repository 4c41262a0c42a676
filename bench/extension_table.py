"""The C++ extension on this CPU against plain SDPA, per dtype, forward and backward: markdown tables and a CSV.

    python -m bench.extension_table                      # temporal attention, forward, fp32/bf16/fp16, both modes
    python -m bench.extension_table --backward --dit     # also forward+backward, and DiT long rows
    python -m bench.extension_table --peers              # also SDPA + bias, the naive form and the torch fallback
    python -m bench.extension_table --frames 16 --head-dims 40 --tokens 256 --heads 2 --rounds 2 --no-csv  # smoke

Temporal shapes follow temporal attention in a video UNet: ``--tokens`` = batch·frames (B·H·W·F of a latent) of
``--heads`` heads, as (batch, frames, heads, head_dim) views of one fused projection. DiT shapes (``--dit``) are one
sequence of L tokens in 16 latent frames of L/16 tokens (``--dit-lengths``, ``--dit-heads``, ``--dit-head-dim``).
``--backward`` also times forward+backward to the fused projection (``--backward-rounds`` rounds).

Every provider of a point is timed in the same interleaved rounds; ratios are medians over plain SDPA's (no bias, the
floor) from those rounds. Each table is headed by the machine (CPU, ISA, threads, torch, the extension's GEMM paths);
rows are appended to ``--csv`` (default bench/results/extension_table.csv) and a summary checks the extension's worst
ratio per (kind, pass, dtype) against its target: forward <= 1.05x, forward+backward <= 1.10x.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vstar_kernels.bench.providers import PROVIDERS, Case, forward_backward, make_case
from vstar_kernels.bench.records import append_csv, cpu_model, run_metadata
from vstar_kernels.bench.sweep import MATERIALISED_BYTES, MATERIALISED_CAP_GIB
from vstar_kernels.bench.timing import Timing, time_side_by_side

FLOOR = "sdpa"
PEERS = ("sdpa_bias", "naive", "torch")  # --peers: slow at F = 256
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DIT_FRAMES = 16  # latent frames of a DiT sequence
TARGETS = {"forward": 1.05, "forward+backward": 1.10}  # extension / SDPA, the worst row of a table
CSV_PATH = Path(__file__).resolve().parent / "results" / "extension_table.csv"
CSV_FIELDS = (
    "run_id", "timestamp", "device_name", "isa", "threads", "torch", "vstar_kernels", "gemm_paths", "kind", "pass",
    "mode", "dtype", "frames", "tokens_per_frame", "length", "heads", "head_dim", "batch", "provider", "median_ms",
    "p20_ms", "p80_ms", "ratio_to_sdpa",
)


@dataclass(frozen=True)
class Shape:
    """One point: ``tokens`` = batch·length tokens, sequences of ``length`` tokens (frames of ``tokens_per_frame``)."""

    tokens: int
    length: int
    heads: int
    head_dim: int
    tokens_per_frame: int = 1

    @property
    def batch(self) -> int:
        return max(1, self.tokens // self.length)

    @property
    def frames(self) -> int:
        return self.length // self.tokens_per_frame


def gemm_paths() -> str:
    """The extension's GEMM path per dtype (``cpu_gemm_info``) as one compact string, "unknown" where it has none."""
    try:
        from vstar_kernels.backends import extension

        info = extension.cpu_gemm_info()
    except Exception:  # not there yet (AttributeError), or the extension does not build
        return "unknown"
    return ";".join(f"{k}={v}" for k, v in info.items()) if isinstance(info, dict) else str(info)


def machine_line(meta: dict[str, str]) -> str:
    return (f"{meta['device_name']} | ISA {meta['isa']} | {meta['threads']} threads | torch {meta['torch']} | "
            f"extension GEMM paths: {meta['gemm_paths']}")


def _over_cap(name: str, case: Case) -> str | None:
    """Why a materialising peer is skipped on a DiT row (the sweep's cap on Lq x Lk tensors)."""
    if case.tokens_per_frame == 1 or name not in MATERIALISED_BYTES:
        return None
    gib = case.q.shape[0] * case.q.shape[2] * case.q.shape[1] * case.k.shape[1] * MATERIALISED_BYTES[name] / 2**30
    return f"materialises ~{gib:.0f} GiB (cap {MATERIALISED_CAP_GIB:g} GiB)" if gib > MATERIALISED_CAP_GIB else None


def measure(shape: Shape, mode: str, dtype: torch.dtype, backward: bool, providers: list[str],
            rounds: int) -> tuple[dict[str, Timing], dict[str, str]]:
    """Timings of the providers that can run this point, and why the others cannot."""
    case = make_case(shape.tokens, shape.length, shape.heads, shape.head_dim, mode, dtype=dtype,
                     requires_grad=backward, tokens_per_frame=shape.tokens_per_frame)
    thunks: dict[str, Callable[[], object]] = {}
    skipped: dict[str, str] = {}
    for name in providers:
        reason = PROVIDERS[name].unavailable(case) or _over_cap(name, case)
        if reason is not None:
            skipped[name] = reason
            continue
        thunk = PROVIDERS[name].build(case)
        thunks[name] = forward_backward(thunk, case) if backward else thunk
    return time_side_by_side(thunks, device=case.q.device, rounds=rounds), skipped


def _ms(ms: float) -> str:
    return f"{ms:.3g} ms"


def run_table(kind: str, pass_: str, dtype_name: str, shapes: list[Shape], args: argparse.Namespace,
              providers: list[str], meta: dict[str, str], emit: Callable[[str], None],
              csv_path: Path | None) -> list[tuple[float, str]]:
    """One table (kind, pass, dtype) over modes x shapes; returns (extension ratio, row label) per row."""
    rounds = args.backward_rounds if pass_ == "forward+backward" else args.rounds
    shape_cols = ("F", "d") if kind == "temporal" else ("L", "frames x tokens", "d")
    first = shapes[0]
    sizes = (f"{first.tokens} tokens (batch = tokens / F) x {first.heads} heads" if kind == "temporal"
             else f"one sequence of L tokens in {DIT_FRAMES} frames x {first.heads} heads")
    emit("")
    emit(f"### {kind}, {pass_}, {dtype_name}: {sizes}, median of {rounds} rounds")
    emit("")
    emit(machine_line(meta))
    emit("")
    emit("| mode | " + " | ".join(shape_cols) + " | " + " | ".join(PROVIDERS[p].label for p in providers) + " |")
    emit("|" + " --- |" * (1 + len(shape_cols) + len(providers)))
    ratios: list[tuple[float, str]] = []
    notes: dict[str, str] = {}
    for mode in args.modes:
        for shape in shapes:
            times, skipped = measure(shape, mode, DTYPES[dtype_name], pass_ == "forward+backward", providers, rounds)
            notes.update(skipped)
            floor = times[FLOOR].median
            label = (f"{mode} F={shape.length} d={shape.head_dim}" if kind == "temporal"
                     else f"{mode} L={shape.length} d={shape.head_dim}")
            cells = []
            for p in providers:
                if p not in times:
                    cells.append("n/a")
                    continue
                ratio = times[p].median / floor
                cell = _ms(times[p].median) if p == FLOOR else f"{_ms(times[p].median)} ({ratio:.2f}x)"
                cells.append(f"**{cell}**" if p == "extension" else cell)
                if p == "extension":
                    ratios.append((ratio, label))
            dims = ((shape.length, shape.head_dim) if kind == "temporal"
                    else (shape.length, f"{shape.frames} x {shape.tokens_per_frame}", shape.head_dim))
            emit(f"| {mode} | " + " | ".join(str(x) for x in dims) + " | " + " | ".join(cells) + " |")
            if csv_path is not None:
                rows = [{"kind": kind, "pass": pass_, "mode": mode, "dtype": dtype_name, "frames": shape.frames,
                         "tokens_per_frame": shape.tokens_per_frame, "length": shape.length, "heads": shape.heads,
                         "head_dim": shape.head_dim, "batch": shape.batch, "provider": p,
                         "median_ms": f"{t.median:.4f}", "p20_ms": f"{t.p20:.4f}", "p80_ms": f"{t.p80:.4f}",
                         "ratio_to_sdpa": f"{t.median / floor:.4f}"} for p, t in times.items()]
                append_csv(csv_path, rows, meta, fields=CSV_FIELDS)
    for name, reason in notes.items():
        emit(f"\n{PROVIDERS[name].label} n/a: {reason}")
    return ratios


def summary(worst: dict[tuple[str, str, str], list[tuple[float, str]]]) -> list[str]:
    """The extension's max ratio per (kind, pass, dtype) against its target."""
    lines = ["", "### Summary: extension / SDPA, the worst row of each table", ""]
    for (kind, pass_, dtype_name), ratios in worst.items():
        target = TARGETS[pass_]
        if not ratios:
            lines.append(f"- {kind} {dtype_name} {pass_}: no extension rows (unavailable)")
            continue
        ratio, label = max(ratios)
        verdict = "ok" if ratio <= target else "MISSED"
        lines.append(f"- {kind} {dtype_name} {pass_}: max {ratio:.2f}x (target {target:.2f}x) {verdict}, at {label}")
    return lines


def _check_csv_header(path: Path) -> str | None:
    """Why rows cannot be appended to an existing CSV (None: they can)."""
    if not path.exists():
        return None
    with path.open(newline="") as handle:
        header = next(csv.reader(handle), [])
    if tuple(header) != CSV_FIELDS:
        return f"{path} has other columns than this benchmark writes: move it or pass another --csv"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 128, 256], help="temporal: frames F")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[40, 64, 80, 160], help="temporal: head_dim")
    parser.add_argument("--tokens", type=int, default=8192, help="temporal: batch x F tokens per point")
    parser.add_argument("--heads", type=int, default=8, help="temporal: heads")
    parser.add_argument("--rounds", type=int, default=15, help="forward rounds")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=("relative", "absolute"), default=["relative", "absolute"])
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--backward-rounds", type=int, default=5, help="forward+backward rounds")
    parser.add_argument("--dit", action="store_true", help="also DiT long rows: one sequence of L tokens, batch 1")
    parser.add_argument("--dit-lengths", type=int, nargs="+", default=[4096, 8192, 16384],
                        help=f"DiT: tokens L, in {DIT_FRAMES} latent frames of L / {DIT_FRAMES}")
    parser.add_argument("--dit-heads", type=int, default=2)
    parser.add_argument("--dit-head-dim", type=int, default=128)
    parser.add_argument("--peers", action="store_true", help=f"also {', '.join(PEERS)} (slow at F = 256)")
    parser.add_argument("--csv", type=Path, default=CSV_PATH, help="append rows here")
    parser.add_argument("--no-csv", action="store_true", help="write no CSV")
    parser.add_argument("--markdown", type=Path, help="also write the tables and the summary to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.rounds, args.backward_rounds) < 1:
        parser.error("--rounds and --backward-rounds must be >= 1")
    if args.dit and any(n < DIT_FRAMES or n % DIT_FRAMES for n in args.dit_lengths):
        parser.error(f"--dit-lengths must be multiples of {DIT_FRAMES} (the latent frames)")
    csv_path = None if args.no_csv else args.csv
    if csv_path is not None and (why := _check_csv_header(csv_path)):
        parser.error(why)

    base = run_metadata(torch.device("cpu"))
    meta = {**{k: v for k, v in base.items() if k in CSV_FIELDS}, "device_name": cpu_model(),
            "isa": torch.backends.cpu.get_cpu_capability(), "threads": str(torch.get_num_threads()),
            "gemm_paths": gemm_paths()}
    providers = [FLOOR, *(PEERS if args.peers else ()), "extension"]
    tables: dict[str, list[Shape]] = {
        "temporal": [Shape(args.tokens, f, args.heads, d) for f in args.frames for d in args.head_dims]}
    if args.dit:
        tables["dit"] = [Shape(n, n, args.dit_heads, args.dit_head_dim, n // DIT_FRAMES) for n in args.dit_lengths]
    passes = ["forward", "forward+backward"] if args.backward else ["forward"]

    out: list[str] = []

    def emit(line: str) -> None:
        out.append(line)
        print(line, flush=True)

    emit(f"run {meta['run_id']} at {meta['timestamp']}")
    worst: dict[tuple[str, str, str], list[tuple[float, str]]] = {}
    for kind, shapes in tables.items():
        for pass_ in passes:
            for dtype_name in args.dtypes:
                worst[(kind, pass_, dtype_name)] = run_table(kind, pass_, dtype_name, shapes, args, providers, meta,
                                                             emit, csv_path)
    for line in summary(worst):
        emit(line)
    if csv_path is not None:
        print(f"\nrows appended to {csv_path}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(out) + "\n")
        print(f"tables written to {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
