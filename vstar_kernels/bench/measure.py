"""Measurement helpers shared by the sweep and the end-to-end runs: failure capture and peak memory.

Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` around the call. On the CPU there is no allocator
counter, so the call runs in a fresh subprocess: the peak resident set is reset just before the call (Linux
``/proc/self/clear_refs``) and its growth over the call is the measure (elsewhere: ``ru_maxrss`` growth). A child
killed by the OS (the out-of-memory killer) or raising an out-of-memory error is recorded as ``oom``, never a crash
of the runner.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

OOM = "oom"


def failure_status(exc: BaseException) -> str:
    """``oom`` for out-of-memory errors, else ``error: <message>`` (one line)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower():
        return OOM
    return "error: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def probe(thunk: Callable[[], object]) -> str:
    """Run once: ``ok`` or the failure status."""
    try:
        with torch.inference_mode():
            thunk()
    except Exception as exc:  # an OOM or a provider that cannot run this point must not stop the sweep
        return failure_status(exc)
    return "ok"


def peak_in_process(thunk: Callable[[], object], device: torch.device) -> float:
    """MiB: CUDA allocator peak over one call, or (CPU) the growth of this process's peak RSS over it."""
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            thunk()
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - base) / 2**20
        if _reset_peak_rss():  # Linux: the peak (VmHWM) restarts from the current RSS, so the growth is the call's
            before = _status_kib("VmRSS")
            thunk()
            return (_status_kib("VmHWM") - before) / 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # elsewhere: only growth above earlier peaks
        thunk()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def run_child(module: str, payload: dict, timeout: float = 1800) -> dict:
    """``python -m module --child JSON`` in a fresh process; its last stdout line is a JSON dict."""
    cmd = [sys.executable, "-m", module, "--child", json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"error: timeout after {timeout:.0f} s"}
    if proc.returncode < 0 or proc.returncode == 137:  # killed by a signal: the OOM killer on Linux
        return {"status": OOM}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": OOM if "out of memory" in tail.lower() else f"error: {tail[:200]}"}
    return json.loads(lines[-1])


def run_torchrun(module: str, payload: dict, world: int, timeout: float = 1800) -> dict:
    """``torchrun --standalone --nproc-per-node world -m module --child JSON`` with ``payload["report_dir"]`` set to
    a fresh folder, where each rank writes ``rank<r>.json``: ``{"status": "ok", "reports": [...]}`` in rank order,
    or ``{"status": "error: ..."}``. The ranks share the CPU cores (``OMP_NUM_THREADS`` = cores // world)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), "-m",
               module, "--child", json.dumps({**payload, "report_dir": tmp})]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"status": f"error: timeout after {timeout:.0f} s"}
        reports = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
        if proc.returncode != 0 or len(reports) != world:
            errors = [line for line in proc.stderr.splitlines()
                      if ("Error" in line or "terminate" in line) and "ChildFailedError" not in line]
            return {"status": "error: " + (errors or [f"exit status {proc.returncode}"])[-1][:300]}
    return {"status": "ok", "reports": sorted(reports, key=lambda r: r.get("rank", 0))}
