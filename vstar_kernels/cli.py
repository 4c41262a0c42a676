"""The ``vstar-kernels`` command. ``vstar-kernels info`` says what is installed and which backend runs."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Sequence

import torch

from ._version import __version__
from .backends import AUTO_ORDER, BACKENDS, DEFAULT_AUTO_ORDER, extension
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
    for device in _devices():
        lines += ["", f"backends on {device.type}:"]
        for name, impl in BACKENDS.items():
            reason = impl.unavailable_reason(device)
            lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
        order = AUTO_ORDER.get(device.type, DEFAULT_AUTO_ORDER)
        chosen = next((n for n in order if BACKENDS[n].unavailable_reason(device) is None), "none")
        lines.append(f"  auto -> {chosen}  (tries {', '.join(order)})")
    ext = extension.status()
    built = "loaded" if ext["loaded"] else f"not loaded: {ext['error']}"
    lines += ["", f"extension build: {built}", f"  cache: {ext['location']}", f"  CPU ISA: {ext['isa']}",
              f"  {extension.NO_BUILD_ENV}={os.environ.get(extension.NO_BUILD_ENV, '') or 'unset'}"]
    return lines


def _cmd_info(_: argparse.Namespace) -> int:
    print("\n".join(info_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vstar-kernels", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vstar-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and which backend runs where (and why not)").set_defaults(
        func=_cmd_info
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vstar-kernels`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
