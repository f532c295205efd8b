"""The command line as a new user tries it: one-line errors naming the flag, exit status 2, bad flags
refused before any model is built, a fast `--help`, `--version`, `python -m diffusers_offload`, and
`generate` with its defaults on a machine without an accelerator."""

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from diffusers_offload import cli
from diffusers_offload.cli import main
from diffusers_offload.pipeline import OffloadPipeline
from diffusers_offload.planning import meta
from diffusers_offload.tiny.sd3 import build_tiny_sd3_pipeline

ROOT = Path(__file__).parents[2]


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Fails the test if a model would be built or loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the flags were checked")

    monkeypatch.setattr(meta, "build_meta_components", refuse)
    monkeypatch.setattr(OffloadPipeline, "from_pretrained", refuse)


def one_line_error(capsys, verb: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"diffusers-offload {verb}: error: "), err
    return err


@pytest.mark.parametrize("verb", ["plan", "generate"])
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--budget", "12"], "--budget 12: give a unit, e.g. --budget 12GiB"),
        (["--budget", "-5GiB"], "--budget -5GiB: sizes cannot be negative"),
        (["--budget", "twelve"], "--budget twelve: not a size"),
        (["--reserve", "-1GiB"], "--reserve -1GiB: sizes cannot be negative"),
        (["--budget", "12GiB", "--prefetch", "-1"], "argument --prefetch: -1: must be 0 or more"),
        (["--budget", "12GiB", "--steps", "0"], "argument --steps: 0: must be 1 or more"),
    ],
)
def test_bad_flags_are_one_line_before_any_model_is_built(verb, flags, expected, capsys, nothing_is_built):
    args = [verb, "stabilityai/stable-diffusion-3.5-medium", *flags]
    if verb == "generate":
        args += ["--prompt", "x", "--offload", "layerwise"]
    elif "--budget" not in flags:
        args += ["--budget", "12GiB"]
    assert main(args) == 2
    assert expected in one_line_error(capsys, verb)


@pytest.mark.parametrize("verb", ["plan", "generate"])
def test_a_missing_folder_is_named_as_a_folder(verb, tmp_path, capsys, nothing_is_built):
    missing = tmp_path / "my-model"
    args = [verb, str(missing), *(["--budget", "12GiB"] if verb == "plan" else ["--prompt", "x"])]
    assert main(args) == 2
    err = one_line_error(capsys, verb)
    assert f"no folder {missing}" in err and "unknown model" not in err


def test_argparse_errors_are_one_line_too(capsys):
    assert main(["plan", "sd35-medium"]) == 2  # --budget is required
    assert "the following arguments are required: --budget" in one_line_error(capsys, "plan")
    assert main(["generate", "x/y", "--prompt", "p", "--offload", "fast"]) == 2
    assert "invalid choice: 'fast'" in one_line_error(capsys, "generate")


def test_library_messages_name_the_flag_not_the_python_argument():
    error = ValueError("pass vram_budget as bytes, or use strategy='auto'; lower prefetch (now 1)")
    assert cli._one_line(error) == "pass --budget as bytes, or use --strategy auto; lower --prefetch (now 1)"


def test_an_unexpected_error_is_one_line_and_traceback_shows_it(monkeypatch, capsys):
    def broken(args):
        raise KeyError("text_encoder")

    parser = cli.build_parser

    def patched():
        built = parser()
        built.parse_args = lambda argv: SimpleNamespace(
            run=broken, verb="plan", traceback="--traceback" in argv
        )
        return built

    monkeypatch.setattr(cli, "build_parser", patched)
    assert main(["plan"]) == 2
    assert "error: KeyError: 'text_encoder'" in one_line_error(capsys, "plan")
    with pytest.raises(KeyError):
        main(["--traceback", "plan"])


def test_demo_on_a_device_this_torch_cannot_use(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", "--device", "cuda"]) == 2
    err = one_line_error(capsys, "demo")
    assert "--device cuda: this torch build" in err and "use --device cpu" in err
    assert main(["demo", "--device", "gpu0"]) == 2
    assert "--device gpu0: not a device torch knows" in one_line_error(capsys, "demo")


def test_version_and_python_dash_m(capsys):
    import diffusers_offload

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"diffusers-offload {diffusers_offload.__version__}"
    run = subprocess.run(
        [sys.executable, "-m", "diffusers_offload", "--version"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == f"diffusers-offload {diffusers_offload.__version__}"


def test_help_imports_neither_torch_nor_diffusers():
    # The measurable cause of a slow --help: importing torch and diffusers (seconds) for a usage text.
    code = (
        "import sys, time; start = time.perf_counter()\n"
        "from diffusers_offload.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = {'torch', 'diffusers', 'transformers'} & set(sys.modules)\n"
        "print(time.perf_counter() - start, sorted(heavy))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    seconds, imported = run.stdout.strip().splitlines()[-1].split(" ", 1)
    assert imported == "[]"
    assert float(seconds) < 0.5


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd3")
    build_tiny_sd3_pipeline().save_pretrained(folder)
    return folder


def test_generate_with_defaults_on_a_machine_without_an_accelerator(
    saved_pipeline, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    args = ["generate", str(saved_pipeline), "--prompt", "a cat", "--dtype", "float32", "--steps", "1"]
    assert main([*args, "--height", "64", "--width", "64"]) == 0
    printed = capsys.readouterr().out
    assert "no accelerator found: running on the CPU" in printed
    assert "no offload" in printed and "host copy" not in printed
    with Image.open(tmp_path / "image.png") as image:
        assert image.size == (64, 64)


class FakePipeline:
    """Records where it was moved; stands in for a loaded pipeline on a machine with an accelerator."""

    offload_handle = None

    def __init__(self):
        self.moved_to = []

    def to(self, device):
        self.moved_to.append(torch.device(device))
        return self

    def __call__(self, **kwargs):
        return SimpleNamespace(images=[Image.new("RGB", (8, 8))])


def test_offload_none_moves_the_pipeline_to_the_accelerator(tmp_path, monkeypatch, capsys):
    fake = FakePipeline()
    monkeypatch.setattr(OffloadPipeline, "from_pretrained", lambda *a, **k: fake)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    out = tmp_path / "image.png"
    assert main(["generate", "owner/name", "--prompt", "x", "--offload", "none", "--out", str(out)]) == 0
    assert fake.moved_to == [torch.device("cuda", 0)]
    assert out.exists()


def test_plan_counts_one_block_in_the_singular():
    assert cli._count(1, "block") == "1 block" and cli._count(24, "block") == "24 blocks"


def test_help_text_is_fast_enough_from_the_console_script():
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "diffusers_offload", "--help"], cwd=ROOT, capture_output=True)
    assert run.returncode == 0 and b"usage: diffusers-offload" in run.stdout
    assert time.perf_counter() - start < 3  # interpreter start included; the import itself is checked above


def test_the_torchvision_fallback_notice_is_dropped_and_nothing_else(caplog):
    import logging

    import diffusers_offload  # noqa: F401 (installs the filter on import)

    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING, logger="transformers.utils.import_utils"):
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `X`")
        logger.warning("some other notice")
    assert [r.getMessage() for r in caplog.records] == ["some other notice"]
