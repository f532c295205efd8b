"""The per-model declaration consumed by the offload machinery.

An adapter names pipeline attributes and dotted module paths; it knows nothing of devices, streams or hooks.
Block-list, host-only and resident-tensor paths are dotted from the component root
(``"model.language_model.layers"``); entry methods are plain method names of the component (``"encode"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from .calls import ONE_CALL, DenoiserCalls

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"^(?:{_IDENT}|\d+)(?:\.(?:{_IDENT}|\d+))*$")


def _freeze_paths(value: Any, what: str) -> tuple[str, ...]:
    # A bare string is the classic mistake (``("layers")`` is a str); refuse it instead of iterating chars.
    if isinstance(value, str):
        raise TypeError(f"{what} must be a tuple of strings, got the string {value!r}; write ({value!r},)")
    out = tuple(value)
    for item in out:
        if not isinstance(item, str):
            raise TypeError(f"{what} must contain strings, got {item!r}")
    return out


def _check_dotted(path: str, what: str) -> None:
    if not _DOTTED.match(path):
        raise ValueError(f"{what}: {path!r} is not a dotted attribute path")


def _freeze_mapping(value: Mapping[str, Iterable[str]], what: str) -> Mapping[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping of attribute name -> tuple of paths, got {value!r}")
    frozen = {}
    for key, paths in value.items():
        if not isinstance(key, str) or not re.fullmatch(_IDENT, key):
            raise ValueError(f"{what}: key {key!r} is not a pipeline attribute name")
        frozen[key] = _freeze_paths(paths, f"{what}[{key!r}]")
    return MappingProxyType(frozen)


def find_module_lists(module: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every non-empty ``nn.ModuleList`` inside ``module`` (outermost first, in registration order)."""
    return [
        (name, sub) for name, sub in module.named_modules() if isinstance(sub, nn.ModuleList) and len(sub) > 0
    ]


def describe_module_lists(module: nn.Module, limit: int = 12) -> str:
    """Short human listing of the ModuleLists in ``module``, for error messages."""
    lists = find_module_lists(module)
    if not lists:
        return "none"
    shown = [f"{name or '<root>'} [{len(ml)} x {type(ml[0]).__name__}]" for name, ml in lists[:limit]]
    more = f", ... ({len(lists) - limit} more)" if len(lists) > limit else ""
    return ", ".join(shown) + more


def resolve_path(module: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` inside ``module``.

    Raises:
        ValueError: naming the missing path and the ModuleLists that do exist.
    """
    try:
        return module.get_submodule(path)
    except AttributeError:
        raise ValueError(
            f"{type(module).__name__} has no submodule {path!r}; "
            f"its ModuleLists are: {describe_module_lists(module)}"
        ) from None


@dataclass(frozen=True)
class ModelAdapter:
    """Which pipeline attributes hold the DiT, the encoders and the VAE, and which ModuleLists form blocks.

    Mappings are frozen on construction; a bare string where a tuple is expected raises ``TypeError``.
    """

    name: str  # "sd3", "qwen-image", ...
    pipeline_classes: tuple[str, ...]  # pipeline class names served
    denoiser: str = "transformer"  # pipeline attribute holding the DiT (or the LLM for NextStep)
    block_lists: tuple[str, ...] = ()  # ModuleList paths inside the denoiser, in execution order
    # pipeline attr -> ModuleList paths inside it (for encoder streaming); () if not streamable
    encoders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    vae: str | None = "vae"
    # methods other than forward through which a component is entered
    entry_methods: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {"vae": ("encode", "decode")}
    )
    # component attr -> submodule paths kept on host and loaded only if called (NextStep lm_head)
    host_only: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # streaming is costly (e.g. autoregressive: whole LLM per token); planners should keep blocks resident
    prefer_resident_blocks: bool = False
    notes: str = ""
    # Encoder attrs that are also run autoregressively (``generate``): like prefer_resident_blocks, but for
    # encoders, because streaming their blocks would move the whole encoder once per generated token.
    prefer_resident_encoders: tuple[str, ...] = ()
    # component attr -> parameter/buffer paths the *pipeline* reads directly (not through any entry method),
    # so they must sit on the execution device whenever the pipeline runs.
    resident_tensors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Further pipeline attributes holding denoisers with the denoiser's block lists that run one at a time,
    # each for a range of steps (Wan 2.2's low-noise `transformer_2`); absent or None ones are skipped.
    experts: tuple[str, ...] = ()
    # Denoiser calls per denoising step, from the call's guidance arguments (CFG as a separate call).
    calls: DenoiserCalls = ONE_CALL
    # What one "step" of the denoiser's loop is, for reported traffic: an autoregressive model (NextStep)
    # runs its LLM once per generated image token, not once per denoising step.
    step_unit: str = "denoising step"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("ModelAdapter.name must be a non-empty string")
        set_ = object.__setattr__  # frozen dataclass: normalise in place once
        set_(self, "pipeline_classes", _freeze_paths(self.pipeline_classes, "pipeline_classes"))
        set_(self, "block_lists", _freeze_paths(self.block_lists, "block_lists"))
        set_(
            self,
            "prefer_resident_encoders",
            _freeze_paths(self.prefer_resident_encoders, "prefer_resident_encoders"),
        )
        set_(self, "experts", _freeze_paths(self.experts, "experts"))
        if not isinstance(self.calls, DenoiserCalls):
            raise TypeError(f"adapter {self.name!r}: calls must be a DenoiserCalls, got {self.calls!r}")
        for attr in ("encoders", "entry_methods", "host_only", "resident_tensors"):
            set_(self, attr, _freeze_mapping(getattr(self, attr), attr))

        if not self.pipeline_classes:
            raise ValueError(f"adapter {self.name!r}: pipeline_classes is empty")
        for attr_name in (self.denoiser, self.vae, *self.experts):
            if attr_name is not None and not re.fullmatch(_IDENT, attr_name):
                raise ValueError(f"adapter {self.name!r}: {attr_name!r} is not a pipeline attribute name")
        for path in self.block_lists:
            _check_dotted(path, f"adapter {self.name!r} block_lists")
        for attr in ("encoders", "host_only", "resident_tensors"):
            for key, paths in getattr(self, attr).items():
                for path in paths:
                    _check_dotted(path, f"adapter {self.name!r} {attr}[{key!r}]")
        for key, methods in self.entry_methods.items():
            for method in methods:
                # The hooks wrap `getattr(component, method)`: submodule methods cannot be declared.
                if not re.fullmatch(_IDENT, method):
                    raise ValueError(
                        f"adapter {self.name!r} entry_methods[{key!r}]: {method!r} is not a method name"
                    )
        declared = [*self.denoisers, *self.encoders, *([self.vae] if self.vae is not None else [])]
        if len(set(declared)) != len(declared):
            raise ValueError(
                f"adapter {self.name!r}: denoiser, experts, encoders and vae must be distinct attributes"
            )
        unknown = set(self.prefer_resident_encoders) - set(self.encoders)
        if unknown:
            raise ValueError(
                f"adapter {self.name!r}: prefer_resident_encoders names non-encoders {sorted(unknown)}"
            )

    # Mapping fields are not hashable; identity of an adapter is its name and the classes it serves.
    def __hash__(self) -> int:
        return hash((self.name, self.pipeline_classes))

    # ----------------------------------------------------------------------------------------- lookups
    @property
    def denoisers(self) -> tuple[str, ...]:
        """The denoiser attribute, then its experts: every attribute with role ``"denoiser"``."""
        return (self.denoiser, *self.experts)

    def role(self, attr: str) -> str:
        """``"denoiser"``, ``"encoder"``, ``"vae"`` or ``"other"`` for a pipeline attribute."""
        if attr in self.denoisers:
            return "denoiser"
        if attr in self.encoders:
            return "encoder"
        if attr == self.vae:
            return "vae"
        return "other"

    def block_paths(self, attr: str) -> tuple[str, ...]:
        """Declared block-list paths of a component: the denoisers' block_lists or its encoders entry."""
        if attr in self.denoisers:
            return self.block_lists
        return self.encoders.get(attr, ())

    def prefers_resident(self, attr: str) -> bool:
        """Whether planners should keep this component's blocks resident instead of streaming them."""
        if attr in self.denoisers:
            return self.prefer_resident_blocks
        return attr in self.prefer_resident_encoders

    def components(self, pipe_or_components: Any) -> dict[str, nn.Module]:
        """The ``nn.Module`` components of a pipeline (or of a ``{attr: module}`` dict).

        Declared attributes come first (denoiser, experts, encoders, vae), then any other module component
        with role ``"other"``. Declared experts/encoders/vae that are ``None`` or absent are skipped (e.g. SD3
        without T5, Wan 2.1 without ``transformer_2``).

        Raises:
            ValueError: when the denoiser attribute is missing.
        """
        found = pipeline_modules(pipe_or_components)
        if self.denoiser not in found:
            raise ValueError(
                f"adapter {self.name!r}: the pipeline has no nn.Module attribute {self.denoiser!r} "
                f"(module attributes: {sorted(found) or 'none'})"
            )
        order = [*self.denoisers, *self.encoders, *([self.vae] if self.vae else [])]
        out = {attr: found[attr] for attr in order if attr in found}
        out.update((attr, mod) for attr, mod in found.items() if attr not in out)
        return out

    def blocks(self, module: nn.Module, path: str) -> nn.ModuleList:
        """The ``nn.ModuleList`` at ``path`` inside ``module``.

        Raises:
            ValueError: naming the missing path and the ModuleLists that do exist.
        """
        sub = resolve_path(module, path)
        if not isinstance(sub, nn.ModuleList):
            raise ValueError(
                f"{type(module).__name__}.{path} is a {type(sub).__name__}, not an nn.ModuleList; "
                f"its ModuleLists are: {describe_module_lists(module)}"
            )
        return sub

    def block_lists_of(self, attr: str, module: nn.Module) -> list[tuple[str, nn.ModuleList]]:
        """``(path, ModuleList)`` for each declared block list of a component, in execution order."""
        return [(path, self.blocks(module, path)) for path in self.block_paths(attr)]

    def host_only_of(self, attr: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(path, submodule)`` for each host-only submodule declared for a component."""
        return [(path, resolve_path(module, path)) for path in self.host_only.get(attr, ())]

    def validate(self, pipe_or_components: Any, *, check_entry_methods: bool = True) -> dict[str, nn.Module]:
        """Resolve every declared path against real (or meta) modules; return :meth:`components`.

        Raises:
            ValueError: listing every path, host-only submodule, resident tensor or entry method that
                does not resolve. ``check_entry_methods=False`` skips methods (structure-only module trees).
        """
        comps = self.components(pipe_or_components)
        problems: list[str] = []
        for attr, module in comps.items():
            for path in self.block_paths(attr):
                try:
                    self.blocks(module, path)
                except ValueError as exc:
                    problems.append(f"{attr}: {exc}")
            for path in self.host_only.get(attr, ()):
                try:
                    resolve_path(module, path)
                except ValueError as exc:
                    problems.append(f"{attr} host_only: {exc}")
            for path in self.resident_tensors.get(attr, ()):
                owner, _, leaf = path.rpartition(".")
                try:
                    holder = module.get_submodule(owner) if owner else module
                except AttributeError:
                    holder = None
                if holder is None or (leaf not in holder._parameters and leaf not in holder._buffers):
                    problems.append(f"{attr}: no parameter or buffer {path!r}")
            if check_entry_methods:
                for method in self.entry_methods.get(attr, ()):
                    if not callable(getattr(module, method, None)):
                        problems.append(f"{attr}: no entry method {method!r} on {type(module).__name__}")
        if problems:
            raise ValueError(f"adapter {self.name!r} does not fit this pipeline:\n  " + "\n  ".join(problems))
        return comps


def pipeline_modules(pipe_or_components: Any) -> dict[str, nn.Module]:
    """``{attr: module}`` for the ``nn.Module`` components of a pipeline-like object or a dict.

    Uses ``pipe.components`` for diffusers pipelines, else the instance ``__dict__`` (non-diffusers pipelines
    such as NextStep's keep their models as plain attributes).
    """
    if isinstance(pipe_or_components, Mapping):
        source = pipe_or_components
    else:
        source = getattr(pipe_or_components, "components", None)
        if not isinstance(source, Mapping):
            source = vars(pipe_or_components)
    return {k: v for k, v in source.items() if isinstance(v, nn.Module) and not k.startswith("_")}
