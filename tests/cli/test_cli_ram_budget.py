"""`diffusers-offload generate --ram-budget`: offload loading with the disk tier, from the command line."""

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from diffusers_offload.cli import main
from diffusers_offload.tiny.sd3 import build_tiny_sd3_pipeline, build_tiny_sd3_transformer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny SD3 pipeline with an 8-block transformer of ~10 MB (bf16)."""
    pipe = build_tiny_sd3_pipeline(0, torch.bfloat16)
    pipe.transformer = build_tiny_sd3_transformer(1, torch.bfloat16, num_layers=8, heads=4, head_dim=32)
    target = tmp_path_factory.mktemp("sd3_cli_disk")
    pipe.save_pretrained(target)
    return target


def test_generate_with_a_ram_budget_streams_from_disk(folder, tmp_path, capsys):
    diffusers_logging.disable_progress_bar()
    out = tmp_path / "image.png"
    args = ["generate", str(folder), "--prompt", "a cat", "--device", "cpu", "--steps", "2"]
    args += ["--height", "64", "--width", "64", "--out", str(out)]
    # On the CPU without --budget, --ram-budget streams the DiT layer-wise (no budget: no offload).
    assert main([*args, "--ram-budget", "7.5MB"]) == 0
    printed = capsys.readouterr().out
    assert "transformer disk tier" in printed and out.stat().st_size > 0
    assert main([*args, "--offload", "none", "--ram-budget", "1GiB"]) == 2
    assert "--ram-budget applies" in capsys.readouterr().err
    assert main([*args, "--ram-budget", "2MB"]) == 2
    assert "raise --ram-budget to at least" in capsys.readouterr().err
    diffusers_logging.enable_progress_bar()
