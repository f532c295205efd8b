"""What `pip install` and the sdist ship: every package folder, the adapters under the package's own
name, the files the tests need, a licence, type information, and no wording from our own workflow."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli on 3.10
    import tomli as tomllib

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]

# Phrases from how the configs were gathered, which mean nothing to a user of the package.
INTERNAL = re.compile(
    r"shared/configs|steering|corpus id|code corpus|`docs` corpus|search tool|index id \d", re.I
)


def installed_name(folder: Path) -> str:
    parts = folder.relative_to(ROOT).parts
    if parts[0] == "model_registry":
        parts = ("diffusers_offload", *parts)
    return ".".join(parts)


def test_every_package_folder_is_installed_and_nothing_else():
    folders = [p.parent for p in ROOT.glob("diffusers_offload/**/__init__.py")]
    folders += [p.parent for p in ROOT.glob("model_registry/**/__init__.py")]
    assert sorted(SETUPTOOLS["packages"]) == sorted(installed_name(f) for f in folders)


def test_the_adapters_install_inside_the_package_not_as_a_generic_top_level_name():
    assert SETUPTOOLS["package-dir"] == {"diffusers_offload.model_registry": "model_registry"}
    assert not any(name.split(".")[0] != "diffusers_offload" for name in SETUPTOOLS["packages"])
    import diffusers_offload.model_registry as registry

    assert Path(registry.__file__).parent.resolve() == (ROOT / "model_registry").resolve()
    data = SETUPTOOLS["package-data"]["diffusers_offload.model_registry"]
    assert "configs/**/*.json" in data


def test_the_sdist_carries_what_pytest_and_the_docs_need():
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    for folder in ("tests", "docs", "notebooks", "benchmarks", "scripts"):
        assert folder in manifest, folder
    for name in ("LICENSE", "README.md", "mkdocs.yml"):
        assert name in manifest and (ROOT / name).is_file(), name


def test_licence_typing_and_metadata():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and "Apache License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "diffusers_offload" / "py.typed").is_file()
    assert "Typing :: Typed" in project["classifiers"]
    assert "py.typed" in SETUPTOOLS["package-data"]["diffusers_offload"]
    for requirement in project["dependencies"]:  # each runtime dependency has a tested range
        assert ">=" in requirement and "<" in requirement.replace("<=", ""), requirement
    assert {"docs", "notebook", "plot", "test"} <= set(project["optional-dependencies"])


def test_shipped_files_use_no_wording_from_our_own_workflow():
    shipped = [
        p for p in (ROOT / "model_registry").rglob("*") if p.is_file() and p.suffix in (".md", ".json", ".py")
    ]
    shipped += [p for p in (ROOT / "diffusers_offload").rglob("*.py")]
    shipped += [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    found = [
        f"{p.relative_to(ROOT)}: {m.group(0)}" for p in shipped for m in INTERNAL.finditer(p.read_text())
    ]
    assert found == []


def test_the_wording_check_sees_internal_phrases():
    for phrase in (
        "as stored in the search tool's `docs` corpus",
        "(third-party copy, index id 70834131264)",
    ):
        assert INTERNAL.search(phrase), phrase
