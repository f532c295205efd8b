"""README: its first lines say what is measured and where, and it holds exactly two set-up commands."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()


def test_the_first_lines_say_what_is_measured_and_where():
    opening = " ".join(README.split("\n\n")[1].split())  # the paragraph under the title
    assert opening.startswith("**Measured so far: on the CPU only; no GPU run yet**")
    assert "docs/benchmarks.md" in opening
    assert "not measured on a GPU yet" in (ROOT / "docs" / "benchmarks.md").read_text()


def test_exactly_two_set_up_commands_the_demo_and_the_tests():
    commands = re.findall(r"^ {4}(bash scripts/setup\.sh && .+)$", README, flags=re.M)
    assert commands == [
        "bash scripts/setup.sh && .venv/bin/diffusers-offload demo",
        "bash scripts/setup.sh && .venv/bin/python -m pytest",
    ]


def test_the_tested_versions_are_listed():
    table = README.split("## Tested versions", 1)[1]
    for package in ("torch", "diffusers", "transformers"):
        assert re.search(rf"^\| {package} \|", table, flags=re.M), package
