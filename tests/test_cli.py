"""The vstar-kernels console script."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vstar_kernels import __version__
from vstar_kernels.cli import info_lines, main


def test_info_lists_versions_and_every_backend_with_a_reason(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"vstar-kernels {__version__}" in text
    assert "torch " in text and "triton " in text
    # under the test suite's TRITON_INTERPRET=1 triton runs CPU tensors; torch always runs
    cpu_section = text.split("backends on cpu:")[1]
    assert "triton     available" in cpu_section
    assert "torch      available" in cpu_section
    assert "extension  available" in cpu_section
    assert "auto -> extension" in cpu_section
    assert "extension build:" in text and "cache:" in text


def test_info_names_the_cpu_its_amx_and_each_dtypes_gemm_engine(capsys):
    import torch

    from vstar_kernels.backends import extension
    from vstar_kernels.bench.records import cpu_model

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    amx = "yes" if torch.cpu._is_amx_tile_supported() else "no"
    assert f"CPU: {cpu_model()}, torch ISA {torch.backends.cpu.get_cpu_capability()}, AMX {amx}" in text
    info = extension.cpu_gemm_info()
    for dtype in ("float32", "bfloat16", "float16"):
        assert f"  {dtype:<9} -> {info[dtype]}" in text
    assert "VSTAR_KERNELS_CPU_GEMM=unset (auto)" in text


def test_info_with_a_forced_engine_and_with_a_bad_one():
    import os

    env = dict(os.environ, VSTAR_KERNELS_CPU_GEMM="microkernel")
    res = subprocess.run([sys.executable, "-m", "vstar_kernels", "info"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "  float32   -> microkernel" in res.stdout and "  bfloat16  -> microkernel" in res.stdout
    env["VSTAR_KERNELS_CPU_GEMM"] = "fastest"
    bad = subprocess.run([sys.executable, "-m", "vstar_kernels", "info"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "VSTAR_KERNELS_CPU_GEMM must be one of auto, brgemm_native, brgemm_f32, microkernel" in bad.stderr


def test_info_without_interpreter_explains_triton(monkeypatch):
    from vstar_kernels.backends import triton_tar

    monkeypatch.setattr(triton_tar, "INTERPRETER", False)
    text = "\n".join(info_lines())
    assert "triton     unavailable: CPU tensors run Triton only under TRITON_INTERPRET=1" in text


def test_console_script_entry_point():
    res = subprocess.run([sys.executable, "-m", "vstar_kernels.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and __version__ in res.stdout
    bad = subprocess.run([sys.executable, "-m", "vstar_kernels.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_python_m_vstar_kernels_prints_the_info_report():
    """``python -m vstar_kernels`` (the ecosystem's ``python -m xformers.info`` habit) prints what ``vstar-kernels
    info`` prints; arguments go to the command."""
    res = subprocess.run([sys.executable, "-m", "vstar_kernels"], capture_output=True, text=True, timeout=300)
    info = subprocess.run([sys.executable, "-m", "vstar_kernels.cli", "info"], capture_output=True, text=True,
                          timeout=300)
    assert res.returncode == 0 == info.returncode, res.stderr
    assert res.stdout == info.stdout and "backend" in res.stdout
    version = subprocess.run([sys.executable, "-m", "vstar_kernels", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and __version__ in version.stdout


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vstar_kernels.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=900)


def _assert_no_known_noise(res: subprocess.CompletedProcess) -> None:
    """The library warnings the demo's own choices cause are not shown (see ``tiny.KnownNoise``)."""
    output = res.stdout + res.stderr
    for noise in ("has been deprecated", "should be kept in float32: []", "requires torchvision"):
        assert noise not in output, output[-3000:]


def test_known_noise_filter_drops_only_its_records_and_only_while_installed():
    import logging

    from vstar_kernels.diffusers.tiny import KnownNoise, known_noise_silenced

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect()
    for name, _, _ in KnownNoise.RULES:
        logging.getLogger(name).addHandler(handler)
    try:
        noise = {"diffusers.pipelines.pipeline_utils": "The TextToVideoSDPipeline has been deprecated and will not ...",
                 "diffusers.models.modeling_utils": "There are modules in X that should be kept in float32: [].",
                 "transformers.utils.import_utils": "`CLIPImageProcessor` requires torchvision (not installed); "
                                                    "falling back to `CLIPImageProcessorPil`"}
        assert set(noise) == {name for name, _, _ in KnownNoise.RULES}
        kept = {"diffusers.pipelines.pipeline_utils": "The FooPipeline has been deprecated",
                "diffusers.models.modeling_utils": "should be kept in float32: ['norm']",
                "transformers.utils.import_utils": "something else"}
        with known_noise_silenced():
            for name, message in [*noise.items(), *kept.items()]:
                logging.getLogger(name).warning(message)
        assert seen == list(kept.values())
        seen.clear()
        for name, message in noise.items():  # removed afterwards
            logging.getLogger(name).warning(message)
        assert seen == list(noise.values())
    finally:
        for name, _, _ in KnownNoise.RULES:
            logging.getLogger(name).removeHandler(handler)


def test_demo_writes_video_and_attention_figure(tmp_path):
    res = _cli("demo", "--frames", "12", "--steps", "2", "--size", "16", "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "backend extension on cpu" in res.stdout and "peak memory" in res.stdout and "time" in res.stdout
    _assert_no_known_noise(res)
    from PIL import Image

    with Image.open(tmp_path / "out" / "video.gif") as gif:
        assert gif.n_frames == 12 and gif.size == (16, 16)
    assert (tmp_path / "out" / "attention.png").stat().st_size > 5_000


def test_demo_animatediff_family_runs_past_the_32_position_tables(tmp_path):
    res = _cli("demo", "--family", "animatediff", "--frames", "40", "--steps", "1", "--size", "16",
               "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "motion tables of 32 rows, 40 frames: positions='interpolate' beyond them" in res.stdout
    _assert_no_known_noise(res)
    from PIL import Image

    with Image.open(tmp_path / "out" / "video.gif") as gif:
        assert gif.n_frames == 40 and gif.size == (16, 16)
    assert (tmp_path / "out" / "attention.png").is_file()


def test_demo_family_with_a_model_folder_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    res = _cli("demo", "--model", str(tmp_path), "--family", "animatediff", "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "cannot be combined with --model" in res.stderr
    assert res.stderr.strip().count("\n") == 0


def test_demo_loads_a_local_pipeline_folder(tmp_path):
    from vstar_kernels.diffusers.tiny import text_to_video_pipeline

    text_to_video_pipeline().save_pretrained(tmp_path / "pipe")
    res = _cli("demo", "--model", str(tmp_path / "pipe"), "--frames", "4", "--steps", "1", "--size", "16",
               "--sigma", "2", "--out", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sigma=2.0" in res.stdout and (tmp_path / "out" / "video.gif").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "0"], "--frames must be >= 1"),
        (["--preset", "64D2"], "unknown preset '64D2'"),
        (["--sigma", "-1"], "--sigma must be > 0"),
        (["--model", "/no/such/folder"], "not a diffusers pipeline folder"),
        (["--out", "FILE/sub"], "not writable"),
    ],
)
def test_demo_bad_arguments_are_one_line(tmp_path, args, message):
    (tmp_path / "FILE").write_text("a file, not a folder")
    res = _cli("demo", *[a.replace("FILE", str(tmp_path / "FILE")) for a in args])
    assert res.returncode == 2
    assert message in res.stderr and res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr


@pytest.mark.parametrize("module", ["matplotlib", "diffusers"])
def test_demo_without_its_extra_refuses_before_any_work(monkeypatch, tmp_path, capsys, module):
    """Only part of the demo extra installed: one line naming it, before the pipeline is built (matplotlib used to
    fail only once the attention maps were recorded)."""
    from vstar_kernels import demo

    monkeypatch.setitem(sys.modules, module, None)  # what an absent module looks like to find_spec and import
    monkeypatch.setattr(demo, "_pipeline", lambda args: pytest.fail("the demo started before the check"))
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (f"vstar-kernels demo: error: the demo needs {module}, not installed: "
                   "pip install 'vstar-kernels[demo]'\n")
    assert not (tmp_path / "out").exists()


def test_demo_with_synopsis(tmp_path):
    res = _cli("demo", "--frames", "10", "--steps", "1", "--size", "16", "--out", str(tmp_path),
               "--synopsis", "a snowy field", "a green meadow", "a golden wheat field")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "synopsis: 3 states over 10 frames: a snowy field -> a green meadow -> a golden wheat field" in res.stdout
    bad = _cli("demo", "--frames", "2", "--synopsis", "a", "b", "c")
    assert bad.returncode == 2 and "3 states for 2 frames" in bad.stderr


def test_demo_wan_family_with_synopsis_and_tar(tmp_path):
    """The tiny WanPipeline: TAR on every block's self-attention, per-frame prompts over its latent frames."""
    res = _cli("demo", "--family", "wan", "--frames", "9", "--steps", "1", "--size", "32", "--out", str(tmp_path),
               "--synopsis", "a snowy field", "a green meadow")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 TAR layers (sigma=2.0 latent frames)" in res.stdout
    assert "synopsis: 2 states over 9 frames (3 latent frames): a snowy field -> a green meadow" in res.stdout
    from PIL import Image

    with Image.open(tmp_path / "video.gif") as gif:
        assert gif.n_frames == 9 and gif.size == (32, 32)
    bad = _cli("demo", "--family", "wan", "--frames", "10")
    assert bad.returncode == 2 and "--frames must be 4n + 1 (its VAE), e.g. 9 or 13" in bad.stderr


def test_a_missing_module_of_ours_is_not_reported_as_a_missing_extra(capsys):
    """Only a third-party module names the extra; an ImportError of vstar_kernels itself is a bug and propagates."""
    from vstar_kernels.cli import _missing_extra

    assert _missing_extra("demo", ImportError("no matplotlib", name="matplotlib")) == 1
    assert "pip install 'vstar-kernels[demo]'" in capsys.readouterr().err
    for exc in (ImportError("gone", name="vstar_kernels.diffusers.analysis"), ImportError("no name")):
        with pytest.raises(ImportError) as raised:
            _missing_extra("demo", exc)
        assert raised.value is exc
