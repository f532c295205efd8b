"""Memory budget planner: from byte sizes alone, decide what stays on the device, is swapped or is streamed.

Model of the device (the same one the offload runtime implements):

* ``resident`` components stay on the device for the whole pipeline call.
* ``swapped`` components are copied to the device whole when called and leave before the next one runs,
  so non-resident components never share the device with each other.
* ``streamed`` components keep their non-block part on the device while they run and copy their
  streamed blocks, in execution order, through a ring of ``prefetch + 1`` device slots each sized to
  the largest streamed block; their ``resident_blocks`` stay on the device while they run.

So the predicted peak is ``sum(resident components) + max(active bytes of any other component) + reserve``.

Rules where a choice had to be made:

* ``auto`` tries, in order: everything resident; model swap (the always-resident set is the one that
  keeps the most bytes resident, i.e. moves the fewest bytes per prompt); streaming. In the streaming
  tier only components that cannot fit whole are streamed: a denoiser that fits whole is swapped, since
  that moves nothing per step. No component is kept resident at the expense of streamed blocks (per-step
  traffic dominates); only components that fit in the slack the streamed ones leave are kept resident.
* Resident blocks of a denoiser are spread evenly over the execution order (block 0 first, gaps between
  resident indices differ by at most 1) so streamed copies are evenly spaced and overlap compute. Among
  the spread layouts that fit, the one keeping the most bytes resident wins, which makes bytes moved per
  step non-increasing as the budget grows.
* ``prefer_resident_blocks`` (autoregressive encoders that re-run every block per generated token): since
  components take turns on the device, such an encoder never competes with the denoiser for budget; each
  gets ``budget - reserve`` while it runs. The flag instead changes which blocks stay resident: the
  largest ones (most bytes kept, smallest ring slot) rather than an even spread, because per-token traffic
  is the sum of its streamed blocks however they are spaced.
* ``model`` forces every component to be swapped (as diffusers' model CPU offload does), even when
  everything would fit. ``layerwise`` streams every denoiser even when it fits whole (its blocks are
  then as resident as the budget allows, possibly all of them); other components are swapped, or streamed
  if they cannot fit whole.
* ``bytes_moved_per_call``: streamed blocks per forward for a streamed component (the one-time load of its
  non-block part is ``bytes_loaded_per_call``), the whole size for a swapped one (paid each time it is
  swapped in, once per pipeline call), 0 for a resident one.
* Per step: ``Plan.bytes_moved_per_step`` is ``calls_per_step`` (2 where classifier-free guidance runs the
  unconditional prediction as a second call, see ``model_registry.DenoiserCalls``) times the streamed bytes
  of one denoiser forward. Several denoisers (Wan 2.2's experts) run one at a time, each for a range of
  steps, so the largest of them counts, not their sum: exact for experts of one layout.
* Experts that all stream hand over: during the last blocks of one, the next one's first streamed block
  is copied into a ring slot the first one no longer needs (no extra bytes). Where the budget allows it
  (``ComponentPlan.rest_ahead``) its one-time load (non-block part and resident blocks) is copied then
  too, and the peak covers one expert's active bytes plus another's one-time load; where it does not,
  that load happens when the next expert is entered (the layouts are not changed for it: resident
  blocks save bytes on every step, the switch happens once per call).
* Per image: ``Plan.bytes_moved_per_image`` is ``steps`` times that, plus every one-time load of the call
  (swapped components whole, the non-block part and resident blocks of streamed ones, one pass of each
  streamed encoder). The ring's last prefetch of a call (up to ``prefetch`` blocks per denoiser, loaded
  for a next step that never comes) is not counted.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..engine.blocks import spread_indices
from .activations import ActivationEstimate
from .budget import format_bytes, parse_bytes
from .tables import format_table

ROLES = ("denoiser", "encoder", "vae", "other")
STRATEGIES = ("auto", "model", "layerwise")
# Headroom for activations and the allocator's fragmentation where no estimate from the call's size exists
# (planning.activations); a percentage string such as "10%" is taken of the budget.
DEFAULT_RESERVE = "1GiB"

# Above this many candidates the resident-set search is greedy instead of exhaustive (2**12 subsets).
_EXACT_SEARCH_LIMIT = 12


class ComponentSizesLike(Protocol):
    """The fields the planner reads from ``planning.sizing.ComponentSizes``."""

    @property
    def name(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def block_bytes(self) -> tuple[int, ...]: ...

    @property
    def other_bytes(self) -> int: ...

    @property
    def host_only_bytes(self) -> int: ...

    @property
    def prefer_resident_blocks(self) -> bool: ...


@dataclass(frozen=True)
class ComponentPlan:
    """How one component is placed. Block indices refer to ``ComponentSizes.block_bytes``."""

    name: str
    role: str
    strategy: str  # "resident" | "swapped" | "streamed"
    resident_blocks: tuple[int, ...]  # kept on device while it runs; only for "streamed"
    streamed_blocks: tuple[int, ...]  # copied through the ring on every forward; only for "streamed"
    prefetch: int  # ring has prefetch + 1 slots (0 slots when nothing is streamed); only for "streamed"
    active_device_bytes: int  # device bytes while this component runs (its resident part + ring)
    bytes_moved_per_call: int  # host-to-device bytes per call (see module docstring)
    bytes_loaded_per_call: int = 0  # one-time load when entered: whole if swapped, non-block part if streamed
    rest_ahead: bool = False  # streamed expert: its one-time load is copied during the previous expert


@dataclass(frozen=True)
class Plan:
    """A placement for every component and its predicted device peak and per-step traffic."""

    components: tuple[ComponentPlan, ...]
    budget_bytes: int
    reserve_bytes: int
    peak_device_bytes: int  # predicted peak of weights on device, reserve included
    bytes_moved_per_step: int  # streamed denoiser bytes per denoising step, all of its calls
    calls_per_step: int = 1  # denoiser calls per denoising step (2 with CFG as a separate call)
    steps: int | None = None  # denoising steps of one pipeline call, when known
    bytes_loaded_per_image: int = 0  # one-time loads of one pipeline call (see the module docstring)
    step_unit: str = "denoising step"  # what one step of the denoiser loop is ("image token" for NextStep)
    activations: ActivationEstimate | None = None  # what the reserve was estimated from, if it was

    @property
    def bytes_moved_per_image(self) -> int | None:
        """Host-to-device bytes of one pipeline call (one image or video); None when ``steps`` is unknown."""
        if self.steps is None:
            return None
        return self.steps * self.bytes_moved_per_step + self.bytes_loaded_per_image

    def component(self, name: str) -> ComponentPlan:
        """Return the plan of the component called ``name``; KeyError lists the known names."""
        for comp in self.components:
            if comp.name == name:
                return comp
        known = ", ".join(repr(c.name) for c in self.components)
        raise KeyError(f"no component named {name!r} in this plan (components: {known})")

    def __str__(self) -> str:
        per = self.step_unit.split()[-1]
        headers = (
            "component",
            "role",
            "strategy",
            "blocks res/str",
            "on device",
            "moved/call",
            f"moved/{per}",
        )
        rows = []
        for comp in self.components:
            if comp.strategy == "streamed":
                blocks = f"{len(comp.resident_blocks)}/{len(comp.streamed_blocks)}"
            else:
                blocks = "-"
            per_step = "-"
            if comp.role == "denoiser":
                streamed = comp.bytes_moved_per_call if comp.strategy == "streamed" else 0
                per_step = format_bytes(self.calls_per_step * streamed)
            rows.append(
                (
                    comp.name,
                    comp.role,
                    comp.strategy,
                    blocks,
                    format_bytes(comp.active_device_bytes),
                    format_bytes(comp.bytes_moved_per_call),
                    per_step,
                )
            )
        # Text columns left-aligned, numeric ones right-aligned so the units line up.
        out = [format_table(headers, rows, right=(False, False, False, True, True, True, True))]
        calls = f" ({self.calls_per_step} denoiser calls)" if self.calls_per_step != 1 else ""
        out.append(
            f"{self.title}: peak {format_bytes(self.peak_device_bytes)}"
            f" of {format_bytes(self.budget_bytes)} budget (reserve {format_bytes(self.reserve_bytes)}),"
            f" {format_bytes(self.bytes_moved_per_step)} moved per {self.step_unit}{calls}"
        )
        if self.steps is not None:
            out.append(
                f"{format_bytes(self.bytes_moved_per_image)} moved per image/video at {self.steps} steps"
            )
        switch = self.expert_switch
        if switch is not None:
            out.append(switch)
        if self.activations is not None:
            unused = self.activations.reserve_bytes != self.reserve_bytes
            out.append(f"{self.activations}{' (not used: the reserve was given)' if unused else ''}")
        return "\n".join(out)

    @property
    def expert_switch(self) -> str | None:
        """What the switch between streamed experts loads ahead, or on demand; None without two experts
        that stream blocks."""
        experts = [c for c in self.components if c.role == "denoiser" and c.streamed_blocks]
        if len(experts) < 2:
            return None
        head = format_bytes(max(c.bytes_loaded_per_call for c in experts))
        where = (
            "copied during the previous expert's last blocks"
            if all(c.rest_ahead for c in experts)
            else "loaded when the next expert is entered (it waits for the non-block part; each resident "
            "block for its own copy, at its first forward)"
        )
        return (
            f"expert switch: non-block part and resident blocks ({head}) {where}; the first streamed "
            "block is prefetched into a ring slot the previous expert frees (from the second call on)"
        )

    @property
    def title(self) -> str:
        """What the plan does, named after the denoiser ("layer-wise streaming (prefetch 1)", "model swap",
        "all resident"); encoders streamed beside a swapped or resident denoiser are named too."""
        denoisers = [c for c in self.components if c.role == "denoiser"]
        streamed = [c for c in self.components if c.strategy == "streamed"]
        if any(c.strategy == "streamed" and c.streamed_blocks for c in denoisers):
            prefetch = max(c.prefetch for c in streamed)
            return f"layer-wise streaming (prefetch {prefetch})"
        if any(c.strategy == "streamed" for c in denoisers):
            return "layer-wise, every denoiser block resident"
        others = [c.name for c in streamed]
        also = f", {' and '.join(others)} streamed layer-wise" if others else ""
        if any(c.strategy == "swapped" for c in self.components):
            return f"model swap{also}"
        return f"all resident{also}"


@dataclass(frozen=True)
class _Comp:
    """A validated component: sizes as plain ints."""

    name: str
    role: str
    blocks: tuple[int, ...]
    other: int
    prefer_resident: bool

    @property
    def total(self) -> int:
        return sum(self.blocks) + self.other


@dataclass(frozen=True)
class _Layout:
    """One way to stream a component and what it costs on the device."""

    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    slots: int
    slot_bytes: int
    active: int  # non-block part + resident blocks + ring
    moved: int  # streamed block bytes per forward


def _largest(blocks: tuple[int, ...], k: int) -> tuple[int, ...]:
    """Indices of the k largest blocks (earlier index wins a tie), in execution order."""
    order = sorted(range(len(blocks)), key=lambda i: (-blocks[i], i))
    return tuple(sorted(order[:k]))


@functools.lru_cache(maxsize=128)
def _layouts(comp: _Comp, prefetch: int) -> tuple[_Layout, ...]:
    """Every candidate streaming layout of ``comp``, one per number of resident blocks.

    Cached because budget sweeps re-plan the same components many times and this is O(blocks**2).
    """
    n = len(comp.blocks)
    layouts = []
    for k in range(n + 1):
        resident = _largest(comp.blocks, k) if comp.prefer_resident else spread_indices(n, k)
        kept = set(resident)
        streamed = tuple(i for i in range(n) if i not in kept)
        # A ring deeper than the number of streamed blocks would hold nothing useful.
        slots = min(prefetch + 1, len(streamed))
        slot_bytes = max((comp.blocks[i] for i in streamed), default=0)
        resident_bytes = sum(comp.blocks[i] for i in resident)
        layouts.append(
            _Layout(
                resident=resident,
                streamed=streamed,
                slots=slots,
                slot_bytes=slot_bytes,
                active=comp.other + resident_bytes + slots * slot_bytes,
                moved=sum(comp.blocks[i] for i in streamed),
            )
        )
    return tuple(layouts)


def _best_layout(layouts: tuple[_Layout, ...], capacity: int) -> _Layout:
    """The fitting layout that moves the fewest bytes (then uses the least device memory).

    Because the candidates do not depend on the capacity, a larger capacity only adds candidates, so the
    bytes moved never grow with the budget. Callers have checked that the smallest layout fits.
    """
    fitting = [lay for lay in layouts if lay.active <= capacity]
    return min(fitting, key=lambda lay: (lay.moved, lay.active, len(lay.resident)))


def _choose_resident(candidates: list[_Comp], fixed_active: list[int], capacity: int) -> set[str]:
    """Names of the candidates to keep resident so the most bytes stay put.

    Every candidate not chosen is swapped; ``fixed_active`` are the active bytes of components that are
    streamed. The choice must satisfy ``sum(resident) + max(other active) <= capacity``. Ties prefer keeping
    denoiser bytes resident, then are broken in a fixed order (deterministic plans).
    """

    def fits(chosen: list[bool]) -> bool:
        kept = sum(c.total for c, keep in zip(candidates, chosen) if keep)
        others = [c.total for c, keep in zip(candidates, chosen) if not keep] + fixed_active
        return kept + max(others, default=0) <= capacity

    def key(chosen: list[bool]) -> tuple[int, int]:
        kept = [c for c, keep in zip(candidates, chosen) if keep]
        return sum(c.total for c in kept), sum(c.total for c in kept if c.role == "denoiser")

    m = len(candidates)
    best = [False] * m
    if m <= _EXACT_SEARCH_LIMIT:
        best_key = key(best) if fits(best) else (-1, -1)
        for mask in range(1, 1 << m):
            chosen = [bool(mask >> (m - 1 - i) & 1) for i in range(m)]
            if fits(chosen) and key(chosen) > best_key:
                best, best_key = chosen, key(chosen)
    else:
        # Largest first: keeping big components resident saves the most traffic per prompt.
        for i in sorted(range(m), key=lambda i: -candidates[i].total):
            trial = best.copy()
            trial[i] = True
            if fits(trial):
                best = trial
    return {c.name for c, keep in zip(candidates, best) if keep}


def _normalise(components: Sequence[ComponentSizesLike]) -> list[_Comp]:
    if not components:
        raise ValueError("plan_offload needs at least one component")
    comps: list[_Comp] = []
    seen: set[str] = set()
    for c in components:
        if c.name in seen:
            raise ValueError(f"duplicate component name {c.name!r}")
        seen.add(c.name)
        if c.role not in ROLES:
            raise ValueError(f"component {c.name!r} has role {c.role!r}; expected one of {', '.join(ROLES)}")
        blocks = tuple(int(b) for b in c.block_bytes)
        other = int(c.other_bytes)
        if other < 0 or any(b < 0 for b in blocks):
            raise ValueError(f"component {c.name!r} has negative sizes")
        # host_only_bytes never reach the device before the component is called, so they are ignored.
        comps.append(_Comp(c.name, c.role, blocks, other, bool(getattr(c, "prefer_resident_blocks", False))))
    return comps


def _too_small(
    comp: _Comp,
    need: int,
    layout: _Layout | None,
    *,
    budget: int,
    reserve: int,
    prefetch: int,
    forced_model: bool,
    estimated: bool = False,
    activations: ActivationEstimate | None = None,
) -> ValueError:
    """The error for a budget below the minimum, saying the minimum and what to change."""
    minimum = need + reserve
    if layout is not None and layout.streamed:
        kept = sum(comp.blocks[i] for i in layout.resident)
        resident = f" + {len(layout.resident)} resident block(s) of {format_bytes(kept)}"
        why = (
            f"non-block part {format_bytes(comp.other)}"
            + (resident if layout.resident else "")
            + f" + a ring of {layout.slots} x {format_bytes(layout.slot_bytes)} (largest streamed block)"
        )
    elif comp.blocks and forced_model:
        why = "the whole component, since strategy='model' cannot stream its blocks"
    elif not comp.blocks:
        why = "the whole component, which has no streamable blocks"
    else:
        why = "the whole component"
    at_least = format_bytes(max(minimum, 0), round_up=True)
    fixes = [f"raise the budget to at least {at_least}"]
    if estimated:
        fixes.append(
            f"plan for a smaller image/video or batch (the reserve of {format_bytes(reserve)} is estimated "
            "from them), or give a smaller reserve"
            + (f", or {activations.advice}" if activations is not None and activations.advice else "")
        )
    elif reserve:
        fixes.append(f"use a smaller reserve (now {format_bytes(reserve)})")
    if layout is not None and layout.slots > 1:
        fixes.append(f"lower prefetch (now {prefetch}; 0 keeps a single block slot)")
    if forced_model and comp.blocks:
        fixes.append("use strategy='auto' or 'layerwise' to stream its blocks")
    return ValueError(
        f"budget {format_bytes(budget)} ({budget} bytes) cannot hold this pipeline: it needs at least "
        f"{at_least} ({minimum} bytes). Component {comp.name!r} needs {format_bytes(need)} on the "
        f"device while it runs ({why}), plus a reserve of {format_bytes(reserve)}. "
        f"To fit: {', or '.join(fixes)}."
    )


def plan_offload(
    components: Sequence[ComponentSizesLike],
    budget: int | str,
    *,
    reserve: int | str | None = None,
    prefetch: int = 1,
    strategy: str = "auto",
    device_total: int | None = None,
    calls_per_step: int = 1,
    steps: int | None = None,
    step_unit: str = "denoising step",
    activations: ActivationEstimate | None = None,
) -> Plan:
    """Place every component so the predicted device peak (weights + reserve) stays within ``budget``.

    ``budget`` and ``reserve`` are bytes or strings for :func:`parse_bytes`; a percentage budget is taken of
    ``device_total`` and a percentage reserve of the budget. ``strategy`` is "auto", "model" (swap every
    component whole) or "layerwise" (stream the denoiser). Raises ValueError when the budget cannot hold
    the minimum, naming it in GiB and the ways to get there. ``calls_per_step`` (denoiser calls per
    denoising step) and ``steps`` only scale the reported traffic; they do not change the placement;
    ``step_unit`` names the step in the printed plan ("image token" for an autoregressive denoiser).
    ``reserve=None`` takes ``activations.reserve_bytes`` (see ``planning.activations``: a bigger image or
    video leaves less of the budget to weights) or, without an estimate, ``DEFAULT_RESERVE``.
    See the module docstring for the rules.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(map(repr, STRATEGIES))}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be a non-negative int (blocks copied ahead), got {prefetch!r}")
    if isinstance(calls_per_step, bool) or not isinstance(calls_per_step, int) or calls_per_step < 1:
        raise ValueError(
            f"calls_per_step must be an int >= 1 (denoiser calls per step), got {calls_per_step!r}"
        )
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be None or an int >= 1 (denoising steps per call), got {steps!r}")
    budget_bytes = parse_bytes(budget, total=device_total)
    estimated = reserve is None and activations is not None
    if reserve is None:
        reserve = activations.reserve_bytes if activations is not None else DEFAULT_RESERVE
    reserve_bytes = parse_bytes(reserve, total=budget_bytes)
    comps = _normalise(components)
    capacity = budget_bytes - reserve_bytes  # bytes any moment's weights may use

    layouts = {c.name: _layouts(c, prefetch) for c in comps if c.blocks}
    if strategy == "layerwise":
        streamable = [c for c in comps if c.role == "denoiser" and c.blocks]
        if not streamable:
            raise ValueError("strategy='layerwise' needs a component with role 'denoiser' that has blocks")

    # Minimum check first, so every later step can assume each component fits on its own.
    def minimum(c: _Comp) -> tuple[int, _Layout | None]:
        if strategy == "model" or not c.blocks:
            return c.total, None
        layout = min(layouts[c.name], key=lambda lay: lay.active)
        return layout.active, layout

    # The component needing the most sets the pipeline's minimum; it is the one the error names.
    worst = max(comps, key=lambda c: minimum(c)[0])
    need, layout = minimum(worst)
    if need > capacity:
        raise _too_small(
            worst,
            need,
            layout,
            budget=budget_bytes,
            reserve=reserve_bytes,
            prefetch=prefetch,
            forced_model=strategy == "model",
            estimated=estimated,
            activations=activations,
        )

    streamed: dict[str, _Layout] = {}
    resident: set[str] = set()
    if strategy == "layerwise":
        for c in comps:
            if (c.role == "denoiser" and c.blocks) or c.total > capacity:
                streamed[c.name] = _best_layout(layouts[c.name], capacity)
    elif strategy == "auto":
        if sum(c.total for c in comps) <= capacity:
            resident = {c.name for c in comps}
        elif max(c.total for c in comps) <= capacity:
            resident = _choose_resident(comps, [], capacity)
        else:
            for c in comps:
                if c.total > capacity:
                    streamed[c.name] = _best_layout(layouts[c.name], capacity)
            # Keep swapped components resident only where the streamed ones leave slack for them.
            swapped = [c for c in comps if c.name not in streamed]
            resident = _choose_resident(swapped, [lay.active for lay in streamed.values()], capacity)

    plans = []
    for c in comps:
        if c.name in resident:
            plans.append(ComponentPlan(c.name, c.role, "resident", (), (), 0, c.total, 0))
        elif c.name in streamed:
            lay = streamed[c.name]
            plans.append(
                ComponentPlan(
                    c.name,
                    c.role,
                    "streamed",
                    lay.resident,
                    lay.streamed,
                    max(lay.slots - 1, 0),
                    lay.active,
                    lay.moved,
                    c.other + sum(c.blocks[i] for i in lay.resident),
                )
            )
        else:
            plans.append(ComponentPlan(c.name, c.role, "swapped", (), (), 0, c.total, c.total, c.total))

    always = sum(p.active_device_bytes for p in plans if p.strategy == "resident")
    turns = max((p.active_device_bytes for p in plans if p.strategy != "resident"), default=0)
    # Experts that stream take turns: while one runs its last blocks, the next one's first streamed block
    # goes into a ring slot the first one no longer needs (no extra bytes) and, where it fits beside the
    # running expert, its non-block part and resident blocks are copied ahead too.
    experts = [p for p in plans if p.role == "denoiser" and p.strategy == "streamed" and p.streamed_blocks]
    switch = max(
        (a.active_device_bytes + b.bytes_loaded_per_call for a in experts for b in experts if a is not b),
        default=0,
    )
    if len(experts) > 1 and always + switch <= capacity:
        names = {p.name for p in experts}
        plans = [dataclasses.replace(p, rest_ahead=True) if p.name in names else p for p in plans]
        turns = max(turns, switch)
    # Experts take turns by step range: the largest streamed denoiser sets the traffic of a step.
    per_call = max(
        (p.bytes_moved_per_call for p in plans if p.role == "denoiser" and p.strategy == "streamed"),
        default=0,
    )
    # Once per pipeline call: swaps and non-block parts, and one pass of each streamed non-denoiser.
    once = sum(
        p.bytes_loaded_per_call
        + (p.bytes_moved_per_call if p.strategy == "streamed" and p.role != "denoiser" else 0)
        for p in plans
    )
    return Plan(
        components=tuple(plans),
        budget_bytes=budget_bytes,
        reserve_bytes=reserve_bytes,
        peak_device_bytes=always + turns + reserve_bytes,
        bytes_moved_per_step=calls_per_step * per_call,
        calls_per_step=calls_per_step,
        steps=steps,
        bytes_loaded_per_image=once,
        step_unit=step_unit,
        activations=activations,
    )
