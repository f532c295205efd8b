"""The memory budget planner on synthetic sizes, from "everything fits" down to "impossible".

Every plan is re-checked against the sizes by ``check_plan``, which recomputes device bytes, traffic and the
peak from scratch, so the tests do not trust the planner's own arithmetic.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, replace

import pytest

from diffusers_offload.planning import Plan, plan_offload

GB = 10**9
GIB = 2**30


@dataclass(frozen=True)
class Sizes:
    """Test double with the fields of ``diffusers_offload.planning.sizing.ComponentSizes``."""

    name: str
    role: str
    block_bytes: tuple[int, ...]
    other_bytes: int
    host_only_bytes: int = 0
    prefer_resident_blocks: bool = False

    @property
    def total_bytes(self) -> int:
        """Device bytes of the whole component (host-only parts never count for the planner)."""
        return sum(self.block_bytes) + self.other_bytes


# A 20 GB DiT of 60 blocks, a 16 GB text encoder of 40 blocks, a 300 MB VAE without blocks.
DIT = Sizes("transformer", "denoiser", (320_000_000,) * 60, 800_000_000)
TE = Sizes("text_encoder", "encoder", (390_000_000,) * 40, 400_000_000)
VAE = Sizes("vae", "vae", (), 300_000_000)
PIPE = [DIT, TE, VAE]
# Flux-like DiT: 19 large double-stream blocks, then 38 smaller single-stream ones.
FLUX = Sizes("transformer", "denoiser", (680_000_000,) * 19 + (280_000_000,) * 38, 300_000_000)
T5 = Sizes("text_encoder_2", "encoder", (400_000_000,) * 24, 300_000_000)
CLIP = Sizes("text_encoder", "encoder", (), 250_000_000)
FLUX_PIPE = [FLUX, T5, CLIP, VAE]


def check_plan(plan: Plan, comps: list[Sizes]) -> None:
    """Recompute what the plan claims from the sizes and assert it is consistent and within budget."""
    assert [p.name for p in plan.components] == [c.name for c in comps]
    resident_total = 0
    turns = []
    per_step = 0
    for comp, p in zip(comps, plan.components):
        assert p.role == comp.role
        n = len(comp.block_bytes)
        if p.strategy == "streamed":
            assert sorted(p.resident_blocks + p.streamed_blocks) == list(range(n))
            assert list(p.resident_blocks) == sorted(p.resident_blocks)
            assert list(p.streamed_blocks) == sorted(p.streamed_blocks)
            slots = p.prefetch + 1 if p.streamed_blocks else 0
            # The ring never holds more slots than there are blocks to stream.
            assert slots <= len(p.streamed_blocks)
            slot = max((comp.block_bytes[i] for i in p.streamed_blocks), default=0)
            resident = sum(comp.block_bytes[i] for i in p.resident_blocks)
            assert p.active_device_bytes == comp.other_bytes + resident + slots * slot
            moved = sum(comp.block_bytes[i] for i in p.streamed_blocks)
            assert p.bytes_moved_per_call == moved
            assert p.bytes_loaded_per_call == comp.other_bytes + resident
            if comp.role == "denoiser":
                per_step = max(per_step, moved)  # experts take turns; one denoiser runs per step
            turns.append(p.active_device_bytes)
        elif p.strategy == "swapped":
            assert p.resident_blocks == p.streamed_blocks == ()
            assert p.active_device_bytes == p.bytes_moved_per_call == comp.total_bytes
            turns.append(comp.total_bytes)
        else:
            assert p.strategy == "resident"
            assert p.active_device_bytes == comp.total_bytes and p.bytes_moved_per_call == 0
            resident_total += comp.total_bytes
    # At an expert switch the next expert's one-time load may be copied beside the running one.
    experts = [p for p in plan.components if p.role == "denoiser" and p.strategy == "streamed"]
    experts = [p for p in experts if p.streamed_blocks]
    if any(p.rest_ahead for p in plan.components):
        assert len(experts) > 1 and all(p.rest_ahead for p in experts)
        turns.extend(
            a.active_device_bytes + b.bytes_loaded_per_call for a in experts for b in experts if a != b
        )
    assert plan.peak_device_bytes == resident_total + max(turns, default=0) + plan.reserve_bytes
    assert plan.peak_device_bytes <= plan.budget_bytes
    assert plan.bytes_moved_per_step == plan.calls_per_step * per_step


def ring_minimum(comp: Sizes, prefetch: int) -> int:
    """Device bytes of ``comp`` with every (uniform) block streamed."""
    n = len(comp.block_bytes)
    return comp.other_bytes + min(prefetch + 1, n) * max(comp.block_bytes)


def gaps(indices: tuple[int, ...], n: int) -> list[int]:
    """Distances between consecutive indices, including the wrap-around to the next forward."""
    return [b - a for a, b in zip(indices, indices[1:])] + [n - indices[-1] + indices[0]]


# -- tiers of "auto" -----------------------------------------------------------------------------------


def test_everything_fits_is_all_resident() -> None:
    total = sum(c.total_bytes for c in PIPE)
    plan = plan_offload(PIPE, total + GIB, reserve=GIB)
    check_plan(plan, PIPE)
    assert {p.strategy for p in plan.components} == {"resident"}
    assert plan.peak_device_bytes == total + GIB
    assert plan.bytes_moved_per_step == 0


def test_one_byte_short_of_everything_swaps_and_keeps_the_most_bytes_resident() -> None:
    total = sum(c.total_bytes for c in PIPE)
    plan = plan_offload(PIPE, total + GIB - 1, reserve=GIB)
    check_plan(plan, PIPE)
    # Resident DiT (20 GB) + the largest swapped one (16 GB encoder) fits; so would a resident encoder
    # beside the swapped DiT, but keeping the DiT keeps more bytes in place.
    assert [p.strategy for p in plan.components] == ["resident", "swapped", "swapped"]
    assert plan.peak_device_bytes == DIT.total_bytes + TE.total_bytes + GIB
    assert plan.bytes_moved_per_step == 0


def test_model_swap_keeps_only_what_fits_beside_the_largest_swapped() -> None:
    plan = plan_offload(PIPE, 30 * GB, reserve=0)
    check_plan(plan, PIPE)
    # Neither big component fits beside the other; the VAE fits beside the DiT.
    assert [p.strategy for p in plan.components] == ["swapped", "swapped", "resident"]
    assert plan.peak_device_bytes == DIT.total_bytes + VAE.total_bytes


def test_largest_component_fitting_exactly_still_swaps() -> None:
    plan = plan_offload(PIPE, DIT.total_bytes + GIB, reserve=GIB)
    check_plan(plan, PIPE)
    assert [p.strategy for p in plan.components] == ["swapped", "swapped", "swapped"]
    assert plan.peak_device_bytes == plan.budget_bytes


def test_dit_that_does_not_fit_is_streamed_and_the_encoder_swapped() -> None:
    budget = 16 * GIB
    plan = plan_offload(PIPE, budget, reserve=GIB)
    check_plan(plan, PIPE)
    dit, te, vae = plan.components
    assert dit.strategy == "streamed" and te.strategy == "swapped" and vae.strategy == "swapped"
    # The resident blocks use the budget: one more resident block would no longer fit.
    block = DIT.block_bytes[0]
    assert dit.active_device_bytes <= budget - GIB < dit.active_device_bytes + block
    assert 0 < len(dit.resident_blocks) < 60
    assert plan.bytes_moved_per_step == len(dit.streamed_blocks) * block


def test_huge_text_encoder_is_streamed_too() -> None:
    plan = plan_offload(PIPE, 10 * GIB, reserve=GIB)
    check_plan(plan, PIPE)
    assert plan.component("transformer").strategy == "streamed"
    assert plan.component("text_encoder").strategy == "streamed"
    assert plan.component("vae").strategy == "swapped"
    # Encoder traffic is per prompt, not per step.
    assert plan.bytes_moved_per_step == plan.component("transformer").bytes_moved_per_call


def test_denoiser_that_fits_whole_is_swapped_when_only_the_encoder_streams() -> None:
    small_dit = Sizes("transformer", "denoiser", (100_000_000,) * 20, 200_000_000)  # 2.2 GB
    big_te = Sizes("text_encoder", "encoder", (400_000_000,) * 20, 0)  # 8 GB
    comps = [small_dit, big_te, VAE]
    plan = plan_offload(comps, 5 * GB, reserve=0)
    check_plan(plan, comps)
    assert plan.component("transformer").strategy == "swapped"
    assert plan.component("text_encoder").strategy == "streamed"
    assert plan.bytes_moved_per_step == 0


def test_small_component_kept_resident_in_streaming_slack() -> None:
    tiny = Sizes("image_encoder", "other", (), 50_000_000)
    comps = [DIT, TE, tiny]
    # At this budget the DiT keeps 10 blocks (4.64 GB active) and the encoder 9 (4.69 GB active), which
    # leaves exactly 50 MB that no streamed block can use: the tiny component stays resident there.
    budget = DIT.other_bytes + 12 * 320_000_000 + 100_000_000
    plan = plan_offload(comps, budget, reserve=0)
    check_plan(plan, comps)
    assert len(plan.component("transformer").resident_blocks) == 10
    assert plan.component("text_encoder").active_device_bytes == TE.other_bytes + 11 * 390_000_000
    assert plan.component("image_encoder").strategy == "resident"
    assert plan.peak_device_bytes == budget
    # One byte less and it has to take turns like the others.
    plan = plan_offload(comps, budget - 1, reserve=0)
    check_plan(plan, comps)
    assert plan.component("image_encoder").strategy == "swapped"


# -- monotone, within budget, over a fine sweep -----------------------------------------------------------


@pytest.mark.parametrize(
    ("comps", "prefetch", "strategy"),
    [(PIPE, 1, "auto"), (PIPE, 2, "layerwise"), (FLUX_PIPE, 1, "auto"), (FLUX_PIPE, 0, "layerwise")],
)
def test_sweep_more_budget_never_moves_more_and_never_exceeds_budget(
    comps: list[Sizes], prefetch: int, strategy: str
) -> None:
    reserve = GIB
    total = sum(c.total_bytes for c in comps)
    start = max(ring_minimum(c, prefetch) if c.block_bytes else c.total_bytes for c in comps) + reserve
    step = 23_456_789  # not a multiple of any block size, so thresholds are hit from both sides
    previous = None
    tiers = set()
    for budget in range(start, total + reserve + 3 * step, step):
        plan = plan_offload(comps, budget, reserve=reserve, prefetch=prefetch, strategy=strategy)
        check_plan(plan, comps)
        tiers.add(tuple(p.strategy for p in plan.components))
        if previous is not None:
            assert plan.bytes_moved_per_step <= previous, budget
        previous = plan.bytes_moved_per_step
    assert previous == 0
    # The sweep really crossed the tiers it is meant to.
    if strategy == "auto":
        assert any("streamed" in t for t in tiers)
        assert any("swapped" in t and "streamed" not in t for t in tiers)
        assert ("resident",) * len(comps) in tiers


def test_monotone_for_heterogeneous_blocks_and_deep_prefetch() -> None:
    odd = Sizes("transformer", "denoiser", (5, 90, 7, 60, 3, 3, 80, 40, 1, 70), 11)
    previous = None
    for budget in range(0, 400):
        try:
            plan = plan_offload([odd], budget, reserve=0, prefetch=3, strategy="layerwise")
        except ValueError:
            assert previous is None, f"a budget of {budget} failed after a smaller one worked"
            continue
        check_plan(plan, [odd])
        if previous is not None:
            assert plan.bytes_moved_per_step <= previous
        previous = plan.bytes_moved_per_step
    assert previous == 0


# -- impossible budgets ---------------------------------------------------------------------------------


def test_minimum_is_exact_and_named_in_the_error() -> None:
    reserve = GIB
    # The DiT's 800 MB non-block part + two 320 MB slots exceeds the encoder's 400 MB + two 390 MB slots.
    minimum = max(ring_minimum(DIT, 1), ring_minimum(TE, 1), VAE.total_bytes) + reserve
    assert minimum == DIT.other_bytes + 2 * 320_000_000 + reserve

    plan = plan_offload(PIPE, minimum, reserve=reserve)
    check_plan(plan, PIPE)
    assert plan.peak_device_bytes == minimum
    assert plan.component("transformer").resident_blocks == ()

    with pytest.raises(ValueError) as err:
        plan_offload(PIPE, minimum - 1, reserve=reserve)
    message = str(err.value)
    gib = -(-minimum * 100 // GIB) / 100  # rounded up, so a budget of that size is enough
    assert f"{gib:.2f} GiB" in message and str(minimum) in message
    assert "'transformer'" in message
    assert "prefetch" in message and "reserve" in message and "budget" in message


def test_lower_prefetch_lowers_the_minimum() -> None:
    at_prefetch_0 = max(ring_minimum(c, 0) if c.block_bytes else c.total_bytes for c in PIPE)
    plan_offload(PIPE, at_prefetch_0, reserve=0, prefetch=0)
    with pytest.raises(ValueError, match="lower prefetch"):
        plan_offload(PIPE, at_prefetch_0, reserve=0, prefetch=1)


def test_unstreamable_component_sets_the_minimum() -> None:
    big_vae = Sizes("vae", "vae", (), 3 * GB)
    comps = [DIT, big_vae]
    plan_offload(comps, 3 * GB + GIB, reserve=GIB)
    with pytest.raises(ValueError, match=r"'vae'.*no streamable blocks") as err:
        plan_offload(comps, 3 * GB + GIB - 1, reserve=GIB)
    # No prefetch advice when prefetch is not what blocks the plan.
    assert "prefetch" not in str(err.value)


def test_reserve_larger_than_budget_is_impossible() -> None:
    with pytest.raises(ValueError, match="smaller reserve"):
        plan_offload(PIPE, "1GiB", reserve="2GiB")


# -- spread of resident blocks --------------------------------------------------------------------------


def test_resident_blocks_are_spread_evenly_at_every_budget() -> None:
    seen = set()
    for budget in range(2 * GB, DIT.total_bytes, 97_000_000):
        dit = plan_offload(PIPE, budget, reserve=0, strategy="layerwise").component("transformer")
        k = len(dit.resident_blocks)
        seen.add(k)
        if k == 0 or k == 60:
            continue
        resident_gaps = gaps(dit.resident_blocks, 60)
        assert max(resident_gaps) - min(resident_gaps) <= 1, dit.resident_blocks
        streamed_gaps = gaps(dit.streamed_blocks, 60)
        assert max(streamed_gaps) - min(streamed_gaps) <= 1, dit.streamed_blocks
        # Not front-loaded: resident blocks reach the last stretch of the network.
        assert dit.resident_blocks[-1] >= 60 - -(-60 // k)
    assert len(seen) > 20


def test_prefer_resident_blocks_keeps_the_largest_blocks_and_costs_the_denoiser_nothing() -> None:
    llm = Sizes("text_encoder", "encoder", (300_000_000,) * 20 + (900_000_000,) * 4, 500_000_000, 0, True)
    flagged = plan_offload([DIT, llm], 6 * GB, reserve=0)
    plain = plan_offload([DIT, replace(llm, prefer_resident_blocks=False)], 6 * GB, reserve=0)
    alone = plan_offload([DIT], 6 * GB, reserve=0, strategy="layerwise")
    check_plan(flagged, [DIT, llm])
    enc = flagged.component("text_encoder")
    assert enc.strategy == "streamed"
    # The four 900 MB blocks are kept first: most bytes resident and the ring shrinks to 300 MB slots.
    assert set(range(20, 24)) <= set(enc.resident_blocks)
    assert enc.bytes_moved_per_call < plain.component("text_encoder").bytes_moved_per_call
    # Components take turns, so the flagged encoder does not take budget from the denoiser.
    assert (
        flagged.component("transformer") == plain.component("transformer") == alone.component("transformer")
    )


# -- forced strategies -----------------------------------------------------------------------------------


def test_forced_model_swaps_everything_even_when_it_fits() -> None:
    plan = plan_offload(PIPE, 100 * GB, reserve=GIB, strategy="model")
    check_plan(plan, PIPE)
    assert {p.strategy for p in plan.components} == {"swapped"}
    assert plan.peak_device_bytes == DIT.total_bytes + GIB


def test_forced_model_fails_when_a_component_cannot_fit_whole() -> None:
    plan_offload(PIPE, DIT.total_bytes, reserve=0, strategy="model")
    with pytest.raises(ValueError, match=r"'transformer'.*strategy='auto' or 'layerwise'"):
        plan_offload(PIPE, DIT.total_bytes - 1, reserve=0, strategy="model")
    # The same budget streams fine under "auto".
    check_plan(plan_offload(PIPE, DIT.total_bytes - 1, reserve=0), PIPE)


def test_forced_layerwise_streams_the_denoiser_and_swaps_the_rest() -> None:
    plan = plan_offload(PIPE, 18 * GB, reserve=0, strategy="layerwise")
    check_plan(plan, PIPE)
    assert [p.strategy for p in plan.components] == ["streamed", "swapped", "swapped"]
    assert plan.bytes_moved_per_step > 0


def test_forced_layerwise_with_room_for_everything_keeps_all_blocks_resident() -> None:
    plan = plan_offload(PIPE, 100 * GB, reserve=0, strategy="layerwise")
    check_plan(plan, PIPE)
    dit = plan.component("transformer")
    assert dit.strategy == "streamed"
    assert dit.resident_blocks == tuple(range(60)) and dit.streamed_blocks == ()
    assert plan.bytes_moved_per_step == 0


def test_forced_layerwise_needs_a_denoiser_with_blocks() -> None:
    with pytest.raises(ValueError, match="denoiser"):
        plan_offload([TE, VAE], 100 * GB, strategy="layerwise")


def test_unknown_strategy() -> None:
    with pytest.raises(ValueError, match=r"'sequential'.*'auto'"):
        plan_offload(PIPE, 100 * GB, strategy="sequential")


# -- prefetch ring ---------------------------------------------------------------------------------------


def test_negative_prefetch_raises() -> None:
    with pytest.raises(ValueError, match="prefetch"):
        plan_offload(PIPE, 10 * GB, prefetch=-1)


def test_ring_never_exceeds_streamed_blocks() -> None:
    few = Sizes("transformer", "denoiser", (100, 100, 100), 10)
    # prefetch 8 would ask for 9 slots; three blocks need at most three, so the minimum is 310, not 910.
    for strategy in ("auto", "layerwise"):
        plan = plan_offload([few], 310, reserve=0, prefetch=8, strategy=strategy)
        check_plan(plan, [few])
        assert plan.peak_device_bytes == 310
    with pytest.raises(ValueError, match=r"\(310 bytes\)"):
        plan_offload([few], 309, reserve=0, prefetch=8)


def test_deeper_prefetch_keeps_fewer_blocks_resident() -> None:
    budget = 12 * GB
    resident = [
        len(plan_offload(PIPE, budget, reserve=0, prefetch=p).component("transformer").resident_blocks)
        for p in range(5)
    ]
    # Each extra slot costs one 320 MB block of residency.
    assert resident == [resident[0] - p for p in range(5)]


# -- inputs, output helpers ------------------------------------------------------------------------------


def test_budget_and_reserve_strings() -> None:
    plan = plan_offload(PIPE, "24GiB", reserve="10%")
    assert plan.budget_bytes == 24 * GIB and plan.reserve_bytes == 24 * GIB // 10
    check_plan(plan, PIPE)
    plan = plan_offload(PIPE, "50%", reserve="512MiB", device_total=80 * GIB)
    assert plan.budget_bytes == 40 * GIB
    with pytest.raises(ValueError, match="total"):
        plan_offload(PIPE, "50%")


def test_default_reserve_is_one_gib() -> None:
    assert plan_offload(PIPE, "24GiB").reserve_bytes == GIB


def test_host_only_bytes_do_not_count() -> None:
    with_host = Sizes("transformer", "denoiser", DIT.block_bytes, DIT.other_bytes, host_only_bytes=50 * GB)
    assert plan_offload([with_host, TE, VAE], 12 * GB) == plan_offload(PIPE, 12 * GB)


def test_bad_components() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        plan_offload([DIT, DIT], 100 * GB)
    with pytest.raises(ValueError, match="'unet'"):
        plan_offload([Sizes("x", "unet", (), 1)], 100 * GB)
    with pytest.raises(ValueError, match="at least one"):
        plan_offload([], 100 * GB)


def test_component_lookup() -> None:
    plan = plan_offload(PIPE, 12 * GB)
    assert plan.component("vae").name == "vae"
    with pytest.raises(KeyError, match="'transformer'"):
        plan.component("unet")


def test_str_is_an_aligned_table_with_summary() -> None:
    plan = plan_offload(PIPE, 12 * GB)
    lines = str(plan).splitlines()
    assert len(lines) == 2 + len(PIPE) + 1
    header, rule, *rows, summary = lines
    for word in ("component", "role", "strategy", "on device", "moved/step"):
        assert word in header
    # Each column starts at the same offset on every row.
    columns = [m.start() for m in re.finditer(r"-+", rule)]
    assert len(columns) == 7
    for row, comp in zip(rows, plan.components):
        assert row.startswith(comp.name)
        assert row[columns[1] :].startswith(comp.role)
        assert row[columns[2] :].startswith(comp.strategy)
    dit_row = rows[0]
    assert f"{len(plan.component('transformer').resident_blocks)}/" in dit_row
    assert "streaming" in summary and "moved per denoising step" in summary and "GiB" in summary


def test_real_component_sizes() -> None:
    from diffusers_offload.planning import sizing

    comps = [
        sizing.ComponentSizes(
            name=c.name,
            role=c.role,
            block_bytes=c.block_bytes,
            other_bytes=c.other_bytes,
            # Host-only parts must not count, whatever the class's total_bytes includes.
            host_only_bytes=5 * GB,
        )
        for c in PIPE
    ]
    for budget in (12 * GB, 25 * GB, 40 * GB):
        assert plan_offload(comps, budget) == plan_offload(PIPE, budget)


def test_calls_per_step_multiply_a_step_and_experts_count_once() -> None:
    expert = Sizes("transformer_2", "denoiser", DIT.block_bytes, DIT.other_bytes)
    one = plan_offload([DIT, TE, VAE], 12 * GB)
    plan = plan_offload([DIT, expert, TE, VAE], 12 * GB, calls_per_step=2, steps=30)
    check_plan(plan, [DIT, expert, TE, VAE])
    assert dataclasses.replace(plan.component("transformer_2"), name="transformer") == plan.component(
        "transformer"
    )
    # Two experts that take turns move one expert's blocks per call, twice per step with CFG.
    assert plan.bytes_moved_per_step == 2 * one.bytes_moved_per_step > 0
    loaded = sum(p.bytes_loaded_per_call for p in plan.components)
    streamed_encoder = sum(
        p.bytes_moved_per_call for p in plan.components if p.strategy == "streamed" and p.role == "encoder"
    )
    assert plan.bytes_moved_per_image == 30 * plan.bytes_moved_per_step + loaded + streamed_encoder
    assert "(2 denoiser calls)" in str(plan) and "moved per image/video at 30 steps" in str(plan)
    assert plan_offload(PIPE, 12 * GB).bytes_moved_per_image is None  # steps unknown
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="calls_per_step"):
            plan_offload(PIPE, 12 * GB, calls_per_step=bad)
    with pytest.raises(ValueError, match="steps"):
        plan_offload(PIPE, 12 * GB, steps=0)


def test_streamed_experts_load_the_next_ones_rest_ahead_only_where_it_fits_beside_the_running_one() -> None:
    # Experts whose non-block part is smaller than a block (as Wan 2.2 A14B's: 0.49 GiB next to 0.68 GiB).
    high = Sizes("transformer", "denoiser", (300_000_000,) * 10, 100_000_000)
    low = replace(high, name="transformer_2")
    ring = high.other_bytes + 2 * 300_000_000  # every block streamed, prefetch 1
    fits = plan_offload([high, low], ring + high.other_bytes + GIB, reserve=GIB, strategy="layerwise")
    check_plan(fits, [high, low])
    assert all(p.rest_ahead and not p.resident_blocks for p in fits.components)
    assert fits.peak_device_bytes == ring + high.other_bytes + GIB  # the running expert and the next's rest
    assert "non-block part and resident blocks (95.37 MiB) copied during" in str(fits)
    short = plan_offload([high, low], ring + high.other_bytes - 1 + GIB, reserve=GIB, strategy="layerwise")
    check_plan(short, [high, low])
    assert not any(p.rest_ahead for p in short.components)
    assert short.peak_device_bytes == ring + GIB
    assert "loaded when the next expert is entered" in str(short)
    # The layouts are the same either way; a single denoiser never loads ahead.
    assert [p.resident_blocks for p in fits.components] == [p.resident_blocks for p in short.components]
    alone = plan_offload([high], ring + high.other_bytes + GIB, reserve=GIB, strategy="layerwise")
    assert not alone.components[0].rest_ahead and alone.expert_switch is None


def test_the_plan_is_titled_after_what_the_denoiser_does() -> None:
    # The DiT has no blocks, so it can only be swapped; the encoder does not fit whole and is streamed.
    dit = Sizes("transformer", "denoiser", (), 5 * GB)
    encoder = Sizes("text_encoder", "encoder", (GB,) * 10, GB // 2)
    plan = plan_offload([dit, encoder], 7 * GB, reserve=0)
    assert [c.strategy for c in plan.components] == ["swapped", "streamed"]
    summary = str(plan).splitlines()[-1]
    assert summary.startswith("model swap, text_encoder streamed layer-wise: peak")
    assert str(plan_offload(PIPE, 200 * GB, reserve=0)).splitlines()[-1].startswith("all resident: peak")


def test_an_autoregressive_plan_reports_traffic_per_image_token() -> None:
    plan = plan_offload([DIT, VAE], 12 * GB, reserve=0, step_unit="image token")
    text = str(plan)
    assert "moved/token" in text.splitlines()[0] and "moved per image token" in text
    assert "denoising step" not in text


def test_small_sizes_print_in_a_unit_that_fits() -> None:
    tiny = [Sizes("transformer", "denoiser", (300_000,) * 4, 50_000), Sizes("vae", "vae", (), 20_000)]
    text = str(plan_offload(tiny, "1MiB", reserve=0))
    assert "0.00 GiB" not in text and "KiB" in text
    with pytest.raises(ValueError, match=r"at least 634\.77 KiB \(650000 bytes\)"):
        plan_offload(tiny, "10KiB", reserve=0)
