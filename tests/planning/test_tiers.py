"""The host tier of a plan (`planning.tiers.plan_host`): which streamed blocks stay on disk for a
ram_budget, the host bytes and disk reads it predicts, and the error when even disk streaming cannot fit."""

import pytest

from diffusers_offload.cli import main
from diffusers_offload.planning.sizing import ComponentSizes
from diffusers_offload.planning.tiers import PlacedComponent, plan_host

MB = 1_000_000
DIT = ComponentSizes("dit", "denoiser", (10 * MB,) * 8, 4 * MB)
ENC = ComponentSizes("enc", "encoder", (5 * MB,) * 4, 2 * MB)
VAE = ComponentSizes("vae", "vae", (), 1 * MB)
SIZES = [DIT, ENC, VAE]
# The device plan: the DiT streams all its blocks, the encoder streams blocks 1-3 (block 0 resident).
PLACED = [
    PlacedComponent("dit", "streamed", tuple(range(8)), 2),
    PlacedComponent("enc", "streamed", (1, 2, 3), 2),
    PlacedComponent("vae", "swapped"),
]
ALL_ON_HOST = 80 * MB + 4 * MB + 20 * MB + 2 * MB + 1 * MB


def test_nothing_on_disk_when_the_host_holds_it_all():
    plan = plan_host(SIZES, PLACED, ALL_ON_HOST)
    assert plan.disk_bytes == 0 and plan.staging_bytes == 0 and plan.host_bytes == ALL_ON_HOST
    assert plan.disk_bytes_per_step == 0


def test_encoder_blocks_go_to_disk_before_the_denoisers():
    # 10 MB short: the encoder's 3 streamed blocks (15 MB) minus its staging (2 x 5 MB) are not enough.
    plan = plan_host(SIZES, PLACED, ALL_ON_HOST - 10 * MB, calls_per_step=2)
    assert plan.disk_blocks("enc") == (1, 2, 3)
    assert plan.disk_blocks("dit") != ()
    assert plan.host_bytes <= ALL_ON_HOST - 10 * MB
    # Read once per call for the encoder; per step, the DiT's disk blocks times its two calls.
    assert plan.disk_bytes_per_call == 15 * MB
    assert plan.disk_bytes_per_step == 2 * 10 * MB * len(plan.disk_blocks("dit"))
    assert plan.staging_bytes == 2 * 5 * MB + 2 * 10 * MB


def test_the_fewest_blocks_spread_evenly():
    plan = plan_host([DIT], [PLACED[0]], 4 * MB + 80 * MB - 15 * MB)
    # Each disk block frees 10 MB, the two staging buffers cost 20 MB: 4 blocks free 20 MB net.
    assert plan.disk_blocks("dit") == (0, 2, 4, 6)
    assert plan.host_bytes == 4 * MB + 40 * MB + 20 * MB


def test_the_cpu_device_counts_its_copies_as_host_memory():
    on_host = plan_host([DIT], [PLACED[0]], 200 * MB, device_is_host=True)
    # The DiT's non-block part and its two ring slots live in host memory too when the device is the CPU.
    assert on_host.device_bytes_on_host == 4 * MB + 2 * 10 * MB
    assert on_host.host_bytes == 84 * MB + 24 * MB


def test_too_small_names_the_exact_minimum():
    minimum = 4 * MB + 2 * MB + 5 * MB + 1 * MB + 2 * 10 * MB + 2 * 5 * MB  # all streamed blocks on disk
    assert plan_host(SIZES, PLACED, minimum).host_bytes == minimum
    with pytest.raises(ValueError, match=r"needs at least .*raise ram_budget to at least") as error:
        plan_host(SIZES, PLACED, minimum - 1)
    assert f"({minimum} bytes)" in str(error.value)
    assert "stream more blocks of enc" in str(error.value)  # its resident block has a host copy


def test_plan_prints_the_disk_tier(capsys):
    args = ["plan", "stabilityai/stable-diffusion-3.5-medium", "--budget", "4GiB"]
    assert main([*args, "--ram-budget", "9GiB"]) == 0
    printed = capsys.readouterr().out
    assert "blocks on disk" in printed and "read per denoising step" in printed
    assert "read from disk per image/video" in printed
    assert main([*args, "--ram-budget", "2GiB"]) == 2
    error = capsys.readouterr().err
    assert "raise --ram-budget to at least" in error and len(error.strip().splitlines()) == 1


def test_a_swapped_encoder_streams_from_disk_when_nothing_else_fits():
    t5 = ComponentSizes("t5", "encoder", (20 * MB,) * 6, 3 * MB)
    sizes = [DIT, t5]
    placed = [PLACED[0], PlacedComponent("t5", "swapped")]
    held_whole = 4 * MB + 2 * 10 * MB + 123 * MB  # the DiT all on disk; the T5 whole
    plan = plan_host(sizes, placed, held_whole - 1, prefetch=2)
    assert plan.streamed_instead == ("t5",)
    assert plan.disk_blocks("t5") != ()  # its blocks on disk, read once per call
    assert plan.disk_bytes_per_call == 20 * MB * len(plan.disk_blocks("t5"))
    assert plan.host_bytes <= held_whole - 1
    # Without the need, it stays swapped.
    assert plan_host(sizes, placed, 10**12).streamed_instead == ()


def test_blocks_whose_staging_costs_what_they_free_stay_on_the_host():
    two = ComponentSizes("enc", "encoder", (5 * MB,) * 2, 1 * MB)
    plan = plan_host([DIT, two], [PLACED[0], PlacedComponent("enc", "streamed", (0, 1), 2)], 80 * MB)
    assert plan.disk_blocks("enc") == ()  # 2 blocks on disk free 10 MB and cost 2 x 5 MB of staging
    assert plan.disk_blocks("dit") != ()
