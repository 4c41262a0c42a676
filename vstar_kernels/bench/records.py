"""The records of a benchmark run: the metadata every row of one run shares (device, the CPU's model, versions,
a run id and timestamp) and appending rows to a CSV."""

from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import platform
import uuid
from pathlib import Path

import torch

CSV_FIELDS = (
    "run_id", "timestamp", "device", "device_name", "vstar_kernels", "torch", "triton", "shape", "heads", "head_dim",
    "batch", "frames", "mode", "dtype", "provider", "status", "median_ms", "p20_ms", "p80_ms", "ratio_to_sdpa",
    "peak_mib", "min_bytes", "gflop", "achieved_gbs", "bandwidth_share",
)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo's "model name"), else the platform's processor or machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(device: torch.device) -> dict[str, str]:
    """What every CSV row of one run shares: run id, UTC timestamp, device and versions."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {
        "run_id": uuid.uuid4().hex[:8],
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": name,
        "vstar_kernels": _version("vstar-kernels"),
        "torch": torch.__version__,
        "triton": _version("triton"),
    }


def append_csv(path: Path, rows: list[dict], meta: dict, fields: tuple[str, ...] = CSV_FIELDS) -> None:
    """Append rows (with the run's metadata) to a CSV, writing the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **row})
