"""BENCHMARKS.md is generated from the sidecars in bench/results/ (bench/render.py): the page and the sidecars agree."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"name", "command", "commit", "dirty", "date", "wall_s", "machine", "load", "headline", "tables", "lines", "figures"}


def _module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "bench"))


@pytest.fixture(scope="module")
def render():
    return _module("render")


@pytest.fixture(scope="module")
def sidecars(render):
    cars = render.load_sidecars()
    assert cars, "bench/results/ holds no sidecar"
    return cars


def test_page_is_what_the_sidecars_render(render, sidecars):
    page = (ROOT / "BENCHMARKS.md").read_text()
    assert page == render.render(sidecars), "BENCHMARKS.md is stale or hand-edited: run .venv/bin/python bench/render.py"
    assert len(page.encode()) <= 16_000, f"BENCHMARKS.md is {len(page.encode())} bytes; the page holds current results only"


def test_every_sidecar_is_complete_and_names_a_script_that_exists(sidecars):
    for name, car in sidecars.items():
        assert set(car) >= KEYS, f"{name}: missing {KEYS - set(car)}"
        assert car["name"] == name
        assert car["headline"] and car["tables"], f"{name}: no headline or table"
        m = re.match(r"(?:ONEDNN_MAX_CPU_ISA=\w+ )?HF_HUB_OFFLINE=1 \.venv/bin/python (bench/\S+\.py)", car["command"])
        assert m and (ROOT / m.group(1)).exists(), f"{name}: {car['command']!r}"
        assert car["machine"]["cores"] >= 1 and car["machine"]["cpu"]
        assert 0 <= car["load"]["start"] <= car["load"]["max"] and car["load"]["end"] <= car["load"]["max"]
        assert re.fullmatch(r"[0-9a-f]{7,}", car["commit"]), f"{name}: commit {car['commit']!r}"


def test_every_figure_of_a_sidecar_reaches_the_page(render, sidecars):
    """Negative control for the first test: change one cell or the headline of a sidecar and the page changes."""
    page = render.render(sidecars)
    for name, car in sidecars.items():
        changed = copy.deepcopy(sidecars)
        changed[name]["tables"][0]["rows"][0][-1] += "0"
        assert render.render(changed) != page, f"{name}: a table cell does not reach the page"
        changed = copy.deepcopy(sidecars)
        changed[name]["headline"] += " (edited)"
        assert render.render(changed) != page, f"{name}: the headline does not reach the page"
        assert car["command"] in page and car["commit"] in page


def test_a_sidecar_without_a_section_is_refused(render, sidecars):
    extra = dict(sidecars, mystery=next(iter(sidecars.values())))
    with pytest.raises(SystemExit, match="no section in bench/render.py for mystery"):
        render.render(extra)


def test_sidecar_writes_atomically_and_records_the_run(tmp_path, monkeypatch):
    sidecar = _module("sidecar")
    car = sidecar.Sidecar("probe", argv=[str(ROOT / "bench" / "sidecar.py"), "--x", "1"])
    car.table("t", ["a"], [[1.5]])
    car.headline = "h"
    path = car.save(tmp_path)
    import json

    doc = json.loads(path.read_text())
    assert set(doc) >= KEYS and doc["command"] == "HF_HUB_OFFLINE=1 .venv/bin/python bench/sidecar.py --x 1"
    assert doc["tables"][0]["rows"] == [["1.5"]] and not list(tmp_path.glob("*.tmp"))
