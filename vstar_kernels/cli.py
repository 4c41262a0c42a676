"""The ``vstar-kernels`` command. ``vstar-kernels info`` says what is installed and which backend runs."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Sequence

import torch

from ._version import __version__
from .backends import AUTO_ORDER, BACKENDS, DEFAULT_AUTO_ORDER, extension, extension_build
from .bench.records import cpu_model
from .ops import BACKEND_ENV, requested_backend

_PACKAGES = ("torch", "triton", "diffusers", "transformers", "xformers", "numpy")


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    return devices


def info_lines() -> list[str]:
    """The report printed by ``vstar-kernels info``: versions, devices, backends and the auto choice."""
    lines = [f"vstar-kernels {__version__}", "", "packages:"]
    lines += [f"  {name:<13} {_package_version(name)}" for name in _PACKAGES]
    cuda = torch.version.cuda or "none (CPU build of torch)"
    lines += ["", f"torch CUDA:     {cuda}", f"CUDA available: {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        lines.append(f"  device: {torch.cuda.get_device_name()} (sm_{major}{minor})")
    if os.environ.get(BACKEND_ENV, "").strip():
        try:
            forced = f"forces {requested_backend('auto')!r}"
        except ValueError as exc:
            forced = f"invalid ({exc})"
    else:
        forced = "not set (each call's backend argument decides)"
    lines.append(f"{BACKEND_ENV}: {forced}")
    pending = extension.build_pending()
    for device in _devices():
        lines += ["", f"backends on {device.type}:"]
        reasons = {name: _reason(name, device) for name in BACKENDS}
        for name, reason in reasons.items():
            note = " (builds on first use: about 17 CPU-seconds of g++)" if name == extension.NAME and pending else ""
            lines.append(f"  {name:<10} {'available' + note if reason is None else 'unavailable: ' + reason}")
        order = AUTO_ORDER.get(device.type, DEFAULT_AUTO_ORDER)
        chosen = next((n for n in order if reasons.get(n) is None), "none")
        lines.append(f"  auto -> {chosen}  (tries {', '.join(order)})")
    ext = extension.status()
    built = "loaded" if ext["loaded"] else ("not built yet" if pending else f"not loaded: {ext['error']}")
    lines += ["", f"extension build: {built}", f"  cache: {ext['location']}", f"  CPU ISA: {ext['isa']}",
              f"  {extension.NO_BUILD_ENV}={os.environ.get(extension.NO_BUILD_ENV, '') or 'unset'}"]
    lines += ["", *_cpu_gemm_lines(pending)]
    return lines


def _cpu_gemm_lines(pending: bool) -> list[str]:
    """The CPU's ISA, AMX, and the GEMM engine of each dtype (csrc/cpu_gemm.h); never compiles to find out."""
    amx = "yes" if torch.cpu._is_amx_tile_supported() else "no"
    lines = [f"CPU: {cpu_model()}, torch ISA {torch.backends.cpu.get_cpu_capability()}, AMX {amx}, "
             f"AVX-512 bf16 {'yes' if torch.cpu._is_avx512_bf16_supported() else 'no'}"]
    env = os.environ.get(extension.CPU_GEMM_ENV, "").strip() or "unset (auto)"
    if pending:
        return [*lines, "CPU GEMM engines: known once the extension is built", f"  {extension.CPU_GEMM_ENV}={env}"]
    try:
        info = extension.cpu_gemm_info()
    except (RuntimeError, ValueError) as exc:
        return [*lines, f"CPU GEMM engines: unknown ({exc})"]
    packs = "yes (AMX)" if info["onednn_packs"] else "no"
    lines += [f"CPU GEMM engines (at::native::cpublas): oneDNN packs bf16/fp16 B: {packs}; "
              f"brgemm fp32 runs: {'yes' if info['brgemm_f32'] else 'no'}"]
    lines += [f"  {name:<9} -> {info[name]}" for name in ("float32", "bfloat16", "float16")]
    lines.append(f"  {extension.CPU_GEMM_ENV}={env}")
    return lines


def _reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``; info never compiles the extension to find out."""
    if name == extension.NAME and extension.build_pending():
        if device.type == "cpu" or extension_build.with_cuda():
            return None
        return "a build holds the CUDA kernel only with a CUDA build of torch and a CUDA toolkit"
    return BACKENDS[name].unavailable_reason(device)


def _cmd_info(_: argparse.Namespace) -> int:
    try:
        lines = info_lines()
    except ValueError as exc:  # a bad environment variable (VSTAR_KERNELS_NO_BUILD, VSTAR_KERNELS_CPU_GEMM, ...)
        print(f"vstar-kernels info: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.sweep import run_from_args

    try:
        return run_from_args(args)
    except ImportError as exc:  # rich or matplotlib, imported when the sweep starts
        return _missing_extra("bench", exc)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoError, run_demo

    try:
        return run_demo(args)
    except DemoError as exc:
        print(f"vstar-kernels demo: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # matplotlib, imported when the figure is drawn
        return _missing_extra("demo", exc)


def _missing_extra(extra: str, exc: ImportError) -> int:
    """One line naming the extra that adds a missing third-party module; any other ImportError (one of ours, or
    one without a module name) is a bug, not a missing extra, and propagates."""
    if exc.name is None or exc.name.partition(".")[0] == __name__.partition(".")[0]:
        raise exc
    print(f"vstar-kernels {extra} needs the {extra} extra ({exc.name} is missing): "
          f"pip install 'vstar-kernels[{extra}]'", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vstar-kernels", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vstar-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and which backend runs where (and why not)").set_defaults(
        func=_cmd_info
    )
    demo = sub.add_parser("demo", help="a long single-pass video with TAR on a small offline model, and its "
                                       "temporal attention maps")
    try:
        from .demo import add_arguments as add_demo_options
    except ImportError as exc:
        demo.set_defaults(func=lambda _args, _e=exc: _missing_extra("demo", _e))
    else:
        add_demo_options(demo)
        demo.set_defaults(func=_cmd_demo)
    bench = sub.add_parser("bench", help="benchmark sweep: every TAR provider side by side, CSV and PNG plots")
    try:
        from .bench.sweep import build_parser as add_sweep_options
    except ImportError as exc:  # matplotlib / rich missing: say how to get them when the command runs
        bench.set_defaults(func=lambda _args, _e=exc: _missing_extra("bench", _e))
    else:
        add_sweep_options(bench)
        bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vstar-kernels`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
