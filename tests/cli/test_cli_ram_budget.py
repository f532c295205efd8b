"""`diffusers-offload generate --ram-budget`: offload loading with the disk tier, from the command line."""

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.utils import logging as diffusers_logging

from diffusers_offload.cli import main
from diffusers_offload.tiny.sd3 import build_tiny_sd3_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny SD3 pipeline with an 8-block transformer of ~10 MB (bf16)."""
    pipe = build_tiny_sd3_pipeline(0, torch.bfloat16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        pipe.transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            num_layers=8,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=96,
            caption_projection_dim=128,
            pooled_projection_dim=80,
            out_channels=16,
            pos_embed_max_size=16,
        ).to(torch.bfloat16)
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
