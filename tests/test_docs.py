"""The docs: the recipe reference is the schema's, the README stays a front door, every link resolves."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT
from lora_sdpo.data import detect_format, normalise
from lora_sdpo.recipe import schema_reference

PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_docs_recipe_reference_is_the_schema():
    page = (ROOT / "docs" / "recipes.md").read_text()
    assert schema_reference() in page, "regenerate with: python -m lora_sdpo.recipe, and paste it into docs/recipes.md"


def test_docs_manifest_reference_is_the_records():
    from lora_sdpo.manifest import reference

    page = (ROOT / "docs" / "manifest.md").read_text()
    assert reference() in page, "regenerate with: python -m lora_sdpo.manifest, and paste it into docs/manifest.md"


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 10_000
    # The two commands at the top are CI's and the quickstart's contract.
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert blocks[:2] == [
        "python3 -m venv .venv && .venv/bin/pip install -c requirements/lock.txt -e . && HF_HUB_OFFLINE=1 .venv/bin/lora-sdpo run recipes/quickstart.toml --output runs/quickstart",
        ".venv/bin/pip install -c requirements/lock.txt -e '.[test]' && HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q",
    ]
    # .ci/run installs and tests as the README says
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/pip install --quiet --disable-pip-version-check -c requirements/lock.txt -e '.[test]'" in ci
    assert "\n.venv/bin/python -m pytest -q\n" in ci
    # Every command of the CLI has a row in the README's table.
    from lora_sdpo.cli import main

    for name in main.commands:
        assert f"| `{name} " in readme or f"| `{name}`" in readme, f"README's command table lacks {name}"


def _anchors(text: str) -> set[str]:
    # GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens.
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target} points nowhere"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest.read_text()), f"{page.name}: no heading #{anchor} in {dest.name}"


def test_data_format_examples_are_what_they_say():
    page = (ROOT / "docs" / "data-formats.md").read_text()
    names = {"OpenAI preference": "openai", "ShareGPT": "sharegpt", "Orca pairs": "orca", "Alpaca (LLaMA-Factory)": "alpaca",
             "TRL conversational": "conversational", "UltraFeedback binarized": "conversational",
             "TRL standard": "standard", "Anthropic HH": "hh", "implicit prompt": "implicit"}
    rows = re.findall(r"^\| ([^|]+?) \| .*? \| `(\{.*\})` \|$", page, re.M)
    assert {n for n, _ in rows} == set(names)
    for name, example in rows:
        row = json.loads(example)
        fmt, pair, problem = normalise(row)
        assert detect_format(row) == names[name] == fmt and problem is None, (name, problem)
        assert pair["chosen"] != pair["rejected"] and pair["prompt"]


# A repository path as the docs and comments cite it: under a top-level folder of the repository,
# with a file extension or a closing slash, optionally `::name` (a function or class in that file);
# and the bare upper-case .md names (README.md, BENCHMARKS.md). Placeholders (NAME, N, *) are not paths.
_TOP = "lora_sdpo|tests|bench|scripts|recipes|docs|models|adapters|\\.ci"
_CITED_PATH = re.compile(rf"(?<![\w./-])((?:{_TOP})/[\w./-]*(?:\.\w+|/))(?![\w{{])(::\w+)?")
_CITED_MD = re.compile(r"(?<![\w./-])([A-Z][A-Z_-]*\.md)\b")


def _citing_files() -> list:
    files = [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), ROOT / ".ci" / "run"]
    for folder in ("lora_sdpo", "tests", "bench", "scripts"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh")]
    return sorted(p for p in set(files) if p.is_file() and p.name != "test_docs.py")  # this file cites missing ones on purpose


def cited_paths_that_do_not_exist(text: str, where) -> list[str]:
    import subprocess

    names = {p.rsplit("/", 1)[-1] for p in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()}
    missing = []
    for m in _CITED_PATH.finditer(text):
        path, name = m.group(1), m.group(2)
        if re.search(r"[*{}]|(^|/)[A-Z]{1,}(/|\.|$)", path):
            continue
        target = ROOT / path
        if not target.exists():
            missing.append(path)
        elif name and target.is_file() and not re.search(rf"\b(def|class) {name[2:]}\b", target.read_text()):
            missing.append(path + name)
    missing += [m.group(1) for m in _CITED_MD.finditer(text)
                if m.group(1) not in names and not (where.parent / m.group(1)).exists()]
    return missing


def test_every_cited_repository_file_exists():
    """Docs, comments and docstrings cite files a clone has (`lora_sdpo/merge.py`, `tests/test_x.py::test_y`,
    docs/design.md), not notes kept elsewhere."""
    found = {p.relative_to(ROOT).as_posix(): cited_paths_that_do_not_exist(p.read_text(), p) for p in _citing_files()}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_citation_check_finds_a_missing_file():
    here = ROOT / "docs" / "design.md"
    text = "see DESIGN.md 3, lora_sdpo/nowhere.py, tests/test_invariants.py::test_no_such_test and docs/design.md"
    assert cited_paths_that_do_not_exist(text, here) == ["lora_sdpo/nowhere.py", "tests/test_invariants.py::test_no_such_test", "DESIGN.md"]
    assert cited_paths_that_do_not_exist("tests/test_invariants.py::test_first_loss_of_every_step_is_ln2, RUN/step-N/", here) == []
