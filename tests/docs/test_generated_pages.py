"""The generated docs pages say what the code says now: the model pages' budgets are the planner's, the
CLI page is the parser's --help; the hand-written NextStep table is checked the same way."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from diffusers_offload.cli import main

ROOT = Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location("write_docs", ROOT / "scripts" / "write_docs.py")
write_docs = importlib.util.module_from_spec(spec)
sys.modules["write_docs"] = write_docs  # dataclasses look their module up while the class is built
spec.loader.exec_module(write_docs)


@pytest.fixture(scope="module")
def generated() -> dict[Path, str]:
    return write_docs.pages()


def test_every_generated_page_is_up_to_date(generated):
    stale = [str(p.relative_to(ROOT)) for p, text in generated.items() if p.read_text() != text]
    assert stale == [], "run python scripts/write_docs.py"


def test_each_model_page_lists_budgets_and_says_what_is_not_measured(generated):
    for page in write_docs.PAGES:
        text = generated[ROOT / "docs" / "models" / f"{page.slug}.md"]
        assert "OffloadPipeline.from_pretrained(" in text and f'"{page.hub_id}", dtype=torch.bfloat16' in text
        # Every budget has its row; HunyuanVideo-1.5's default 720p video needs more than 12 GiB.
        assert re.search(r"^\| 12GiB \| ", text, flags=re.M), page.slug
        assert re.search(r"^\| \d+GiB \| .+ \| \d+\.\d\d GiB \|", text, flags=re.M), page.slug
        assert "Not measured on a GPU yet" in text


def test_the_cli_page_documents_every_flag(generated):
    text = generated[ROOT / "docs" / "cli.md"]
    for flag in ("--budget", "--prefetch", "--offload", "--version", "--rows", "--frames"):
        assert flag in text


def test_the_nextstep_table_is_the_planners(capsys):
    table = (ROOT / "docs" / "models" / "nextstep.md").read_text()
    rows = re.findall(r"^\| (\d+GiB) \| ([^|]+) \| ([\d.]+ GiB) \| ([\d.]+ \w?i?B) \|$", table, flags=re.M)
    assert len(rows) == 3
    for budget, placement, peak, moved in rows:
        assert main(["plan", "stepfun-ai/NextStep-1.1", "--budget", budget]) == 0
        printed = capsys.readouterr().out
        assert f"peak {peak} of" in printed and f"{moved} moved per image token" in printed
        if "resident" in placement and "streaming" in placement:
            kept = re.search(r"(\d+) of 48 layers", placement).group(1)
            assert re.search(rf"^model .* streamed +{kept}/{48 - int(kept)} ", printed, flags=re.M)
