"""PNG plots of benchmark CSVs (matplotlib, no display needed)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from vstar_kernels.bench.providers import PROVIDERS

_STYLE = {  # one look per provider across every figure
    "sdpa": dict(color="black", linestyle="--"),
    "naive": dict(color="tab:red"),
    "sdpa_bias": dict(color="tab:orange"),
    "flex": dict(color="tab:purple"),
    "flex_two_pass": dict(color="tab:purple", linestyle=":"),
    "xformers": dict(color="tab:brown"),
    "triton": dict(color="tab:green", linewidth=2.5),
    "extension": dict(color="tab:blue", linewidth=2.5),
    "torch": dict(color="tab:gray"),
}


def read_rows(csv_path: Path, run_id: str | None = None) -> list[dict]:
    """Rows of one run (default: the last run in the file)."""
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return []
    run_id = run_id or rows[-1]["run_id"]
    return [r for r in rows if r["run_id"] == run_id]


def _lines(rows: list[dict], value: str) -> dict[str, list[tuple[int, float]]]:
    by_provider: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row.get(value) and float(row[value]) > 0:  # log axes: a zero (below RSS resolution) is not drawn
            by_provider[row["provider"]].append((int(row["frames"]), float(row[value])))
    return {p: sorted(points) for p, points in by_provider.items()}


def _grid(rows: list[dict], value: str, ylabel: str, title: str, path: Path, xlabel: str = "frames") -> Path | None:
    panels = sorted({(r["shape"], r["mode"]) for r in rows if r.get(value)}, key=lambda p: (p[0], p[1] != "relative"))
    if not panels:
        return None
    shapes = sorted({s for s, _ in panels})
    modes = ["relative", "absolute"]
    fig, axes = plt.subplots(len(shapes), 2, figsize=(11, 3.2 * len(shapes)), squeeze=False, sharex=True)
    for i, shape in enumerate(shapes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            subset = [r for r in rows if r["shape"] == shape and r["mode"] == mode]
            for provider, points in _lines(subset, value).items():
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=PROVIDERS[provider].label,
                        **_STYLE.get(provider, {}))
            for row in subset:  # out-of-memory points as crosses on the axis floor
                if row["status"] == "oom":
                    ax.plot(int(row["frames"]), ax.get_ylim()[0] if ax.lines else 1, "x", color="tab:red")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{shape}, {mode}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel(ylabel)
            if i == len(shapes) - 1:
                ax.set_xlabel(xlabel)
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
            labels[lab] = lab
    fig.tight_layout()
    height = fig.get_figheight()  # legend (two rows) and title above the panels, placed in inches
    fig.legend(list(handles.values()), list(labels), loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4,
               fontsize=8, frameon=False)
    fig.suptitle(title, y=1.0 + 0.55 / height, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_sweep(csv_path: Path, run_id: str | None, out: Path, prefix: str = "sweep") -> list[Path]:
    """<prefix>_time_<device>.png and <prefix>_memory_<device>.png from one run of the sweep."""
    rows = read_rows(csv_path, run_id)
    if not rows:
        return []
    device, meta = rows[0]["device"], rows[0]
    tag = f"{meta['device_name'] or device}, torch {meta['torch']}, {meta['dtype']}, {meta['timestamp']}"
    what = "forward+backward" if "backward" in prefix else "forward"
    dit = prefix.startswith("sweep_dit")
    kind, xlabel = ("TAR on DiT 3D attention", "tokens L") if dit else ("TAR temporal attention", "frames")
    written = [
        _grid(rows, "median_ms", "median ms per call", f"{kind}: {what} time ({tag})",
              out / f"{prefix}_time_{device}.png", xlabel),
        _grid(rows, "peak_mib", "peak MiB (one call)", f"{kind}: {what} peak memory ({tag})",
              out / f"{prefix}_memory_{device}.png", xlabel),
    ]
    return [p for p in written if p is not None]


def plot_e2e(csv_path: Path, run_id: str | None, out: Path) -> list[Path]:
    """e2e_<device>.png: peak memory and time of one UNet forward against frames, per model and processor."""
    rows = read_rows(csv_path, run_id)
    if not rows:
        return []
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.4 * len(models)), squeeze=False)
    styles = {"none": dict(color="black", linestyle="--"), "naive": dict(color="tab:red"),
              "apply_tar": dict(color="tab:blue", linewidth=2.5)}
    for i, model in enumerate(models):
        for j, (value, ylabel) in enumerate((("peak_mib", "peak MiB (RSS growth)"), ("seconds", "seconds"))):
            ax = axes[i][j]
            subset = [r for r in rows if r["model"] == model]
            for processor in ("none", "naive", "apply_tar"):
                points = sorted((int(r["frames"]), float(r[value])) for r in subset
                                if r["processor"] == processor and r.get(value))
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, marker="o", label=processor, **styles[processor])
                for r in subset:
                    if r["processor"] == processor and r["status"] == "oom":
                        ax.annotate("OOM", (int(r["frames"]), ax.get_ylim()[1]), color=styles[processor]["color"],
                                    fontsize=8, ha="center", va="top")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{model}: {ylabel.split(' ')[0]}", fontsize=9)
            ax.set_xlabel("frames")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    meta = rows[0]
    fig.suptitle(f"One single-pass UNet forward ({meta['device_name'] or meta['device']}, torch {meta['torch']})",
                 fontsize=10)
    fig.tight_layout()
    path = out / f"e2e_{meta['device']}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [path]
