"""The layout and its import rule: a lower layer never imports a higher one.

Every import statement of every module is walked (function-level imports and `TYPE_CHECKING` blocks
too), so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Set
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
OURS = ("diffusers_offload",)
# The repository's top-level model_registry/ folder is installed as diffusers_offload.model_registry.
REGISTRY = "diffusers_offload.model_registry"

# Layer -> (modules of this project it may import besides its own, third-party packages it may import;
# None: any). The longest matching prefix names a module's layer; the bare package is the surface.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]] = {
    REGISTRY: ((), ("torch",)),
    "diffusers_offload.tiny": ((), ("torch", "diffusers", "transformers", "tokenizers")),
    "diffusers_offload.engine": ((), ("torch", "diffusers.hooks")),
    "diffusers_offload.planning": (("diffusers_offload.engine.blocks", REGISTRY), None),
    "diffusers_offload": (OURS, None),
}
# What stays at the top of the package: the user-facing surface, and the subpackages.
TOP_LEVEL = {
    "__init__",
    "__main__",
    "pipeline",
    "loader",
    "host_budget",
    "report",
    "traffic",
    "cli",
    "demo",
    "bench",
    "engine",
    "planning",
    "tiny",
}
SUBPACKAGES = (
    "diffusers_offload/engine",
    "diffusers_offload/planning",
    "diffusers_offload/tiny",
    "model_registry",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "model_registry":
        parts = ("diffusers_offload", *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    folders = ("diffusers_offload", "model_registry")
    return {module_name(p): p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))}


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def layer_of(module: str) -> str:
    return max((layer for layer in LAYERS if within(module, (layer,))), key=len)


def imported_modules(module: str, source: str, is_package: bool, known: Set[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from .x` is package.x, `from ..x` the parent's x, ...
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                # `from pkg import submodule` imports the submodule.
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in known else base))
    return found


def violations(
    module: str, source: str, is_package: bool = False, known: Set[str] = frozenset()
) -> list[str]:
    """Every import in `source` (the text of `module`) that its layer does not allow."""
    layer = layer_of(module)
    allowed_ours, allowed_third_party = LAYERS[layer]
    problems = []
    for line, target in imported_modules(module, source, is_package, known):
        top = target.split(".")[0]
        if top == "__future__" or top in sys.stdlib_module_names:
            continue
        if top in OURS:
            if layer_of(target) == layer or within(target, allowed_ours):
                continue
            problems.append(
                f"{module}:{line} imports {target} (layer {layer_of(target)}), above or beside it"
            )
        elif allowed_third_party is not None and not within(target, allowed_third_party):
            problems.append(
                f"{module}:{line} imports {target}; layer {layer} may use only {allowed_third_party}"
            )
    return problems


def test_every_module_obeys_its_layer():
    modules = all_modules()
    problems = []
    for name, path in modules.items():
        problems += violations(name, path.read_text(), path.name == "__init__.py", set(modules))
    assert problems == []


def test_the_walk_sees_every_layer_and_its_real_imports():
    # Guards the test above against passing by construction: the walk covers every layer, and it does
    # see the imports that are known to cross layers.
    modules = all_modules()
    assert {layer_of(name) for name in modules} == set(LAYERS)
    edges = set()
    for name, path in modules.items():
        for _, target in imported_modules(name, path.read_text(), path.name == "__init__.py", set(modules)):
            if target.split(".")[0] in OURS and layer_of(target) != layer_of(name):
                edges.add((layer_of(name), layer_of(target)))
    assert {
        ("diffusers_offload", "diffusers_offload.engine"),
        ("diffusers_offload", "diffusers_offload.planning"),
        ("diffusers_offload", REGISTRY),
        ("diffusers_offload.planning", REGISTRY),
        ("diffusers_offload.planning", "diffusers_offload.engine"),
    } <= edges


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("diffusers_offload.engine.ring", "from ..planning import plan_offload\n"),
        ("diffusers_offload.engine.ring", "def f():\n    from diffusers_offload.pipeline import attach\n"),
        ("diffusers_offload.engine.ring", "import diffusers_offload.model_registry\n"),
        ("diffusers_offload.engine.ring", "from .. import model_registry\n"),
        ("diffusers_offload.engine.ring", "from transformers import AutoModel\n"),
        ("diffusers_offload.planning.sizing", "from ..engine.hooks import register_hook\n"),
        ("diffusers_offload.planning.sizing", "from ..report import build_report\n"),
        ("diffusers_offload.model_registry.sd3", "from diffusers_offload.engine import Placement\n"),
        ("diffusers_offload.model_registry.sd3", "from ..engine import Placement\n"),
        ("diffusers_offload.tiny.sd3", "from diffusers_offload.pipeline import attach\n"),
    ],
)
def test_a_forbidden_import_is_caught(module, source):
    assert len(violations(module, source)) == 1


def test_relative_imports_resolve_to_absolute_modules():
    source = (
        "from ..engine.blocks import spread_indices\nfrom . import sizing\nfrom .budget import parse_bytes\n"
    )
    known = {"diffusers_offload.planning.sizing"}
    assert imported_modules("diffusers_offload.planning.planner", source, False, known) == [
        (1, "diffusers_offload.engine.blocks"),
        (2, "diffusers_offload.planning.sizing"),
        (3, "diffusers_offload.planning.budget"),
    ]
    assert imported_modules("diffusers_offload.engine", "from .ring import PrefetchRing\n", True, set()) == [
        (1, "diffusers_offload.engine.ring")
    ]


def test_allowed_imports_pass():
    assert (
        violations("diffusers_offload.planning.planner", "from ..engine.blocks import spread_indices\n") == []
    )
    assert violations("diffusers_offload.engine.placement", "from .hooks import StreamedBlockHook\n") == []
    assert violations("diffusers_offload.report", "from .engine import OffloadHandle\n") == []


def test_the_top_level_holds_only_the_surface_and_the_subpackages():
    package = ROOT / "diffusers_offload"
    entries = {p.stem for p in package.glob("*.py")} | {p.parent.name for p in package.glob("*/__init__.py")}
    assert entries == TOP_LEVEL


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_each_subpackage_says_what_it_is_for_and_what_it_may_use(package):
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
    assert doc is not None
    lines = doc.strip().splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("May use ")


def test_design_doc_lists_every_module():
    # docs/design.md's module table names each module by its path; the tree and the table must agree.
    table = (ROOT / "docs" / "design.md").read_text().split("## Modules", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for row in re.findall(r"^\| *([^|]+)\|", table, flags=re.M):
        listed |= set(re.findall(r"`([\w/]+\.py)`", row))
    expected = {
        str(path.relative_to(ROOT))
        for path in all_modules().values()
        if path.name != "__init__.py" and path.parent.name not in ("tiny", "model_registry")
    }
    assert expected <= listed, sorted(expected - listed)
    assert listed <= {str(p.relative_to(ROOT)) for p in all_modules().values()}, (
        "the table names a missing module"
    )
