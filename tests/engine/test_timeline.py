"""The timeline of streamed blocks (timing=True): what the report shows of copy, compute and stall."""

import sys

import pytest
import torch

import diffusers_offload as dof
from diffusers_offload.report import build_report


def test_timing_is_off_by_default_and_keeps_outputs_bitwise(dit):
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1)
    assert handle.rings[0].timeline is None
    dit.run(0)
    assert build_report(handle).timelines == ()
    with pytest.raises(RuntimeError, match="timing=True"):
        build_report(handle).plot()
    handle.remove()
    timed = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1, timing=True)
    for i, reference in enumerate(dit.references):
        assert torch.equal(dit.run(i), reference)
    timed.remove()
    dit.assert_restored()


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_cpu_timeline_has_every_block_and_shows_copies_exposed(dit, prefetch):
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=prefetch, timing=True)
    passes = 3
    for i in range(passes):
        dit.run(i)
    (timeline,) = build_report(handle).timelines
    count = len(dit.blocks)
    assert [b.position for b in timeline.blocks] == list(range(count))
    assert all(b.calls == passes for b in timeline.blocks)
    assert all(b.copy_ms > 0 and b.compute_ms > 0 for b in timeline.blocks)
    assert timeline.clock == "wall clock"
    per_pass = timeline.per_pass
    assert per_pass.passes == passes
    assert per_pass.copy_ms == pytest.approx(sum(b.copy_ms for b in timeline.blocks))
    # On the CPU copies are synchronous: each lies inside the wait of the block that issued it, so all of
    # the copy time is exposed and none is hidden.
    assert per_pass.stall_ms >= per_pass.copy_ms
    assert per_pass.hidden_ms == 0 and per_pass.hidden_fraction == 0
    handle.remove()


def test_timeline_stays_bounded(dit):
    from diffusers_offload.engine.timeline import KEPT_PASSES

    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1, timing=True)
    for _ in range(KEPT_PASSES + 3):
        dit.run(0)
    timeline = handle.rings[0].timeline
    assert len(timeline.records) == KEPT_PASSES * len(dit.blocks)
    assert all(b.calls == KEPT_PASSES for b in timeline.blocks())
    handle.remove()


def test_block_that_raises_still_closes_its_record_and_timing_goes_on(dit):
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1, timing=True)

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    dit.blocks[2].ff.forward = explode
    with pytest.raises(RuntimeError, match="boom"):
        dit.run(0)
    del dit.blocks[2].ff.forward
    assert torch.equal(dit.run(1), dit.references[1])
    calls = {b.position: b.calls for b in handle.rings[0].timeline.blocks()}
    assert calls == {0: 2, 1: 2, 2: 2, 3: 1, 4: 1}  # block 2 failed, but its slot was still released
    handle.remove()


def test_report_prints_and_plots_the_timeline(dit, monkeypatch):
    handle = dof.apply_layerwise_offload(dit.model, device="cpu", prefetch=1, timing=True)
    dit.run(0)
    report = build_report(handle)
    text = str(report)
    assert "timeline (wall clock, mean of 1 passes)" in text
    for block in report.timelines[0].blocks:
        assert block.name in text
    assert "stall ms" in report._repr_html_()
    import matplotlib

    matplotlib.use("Agg")
    figure = report.plot()
    bars = figure.axes[0].patches
    assert len(bars) == 3 * len(dit.blocks)  # copy, compute and stall of each block
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.plot()
    handle.remove()
