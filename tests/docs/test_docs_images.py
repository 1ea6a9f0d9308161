"""The pictures in docs/img are what the examples' current code draws: each PNG carries the
digest of the code that made it (``examples/_common.save`` stamps it), and a full run (no
``--quick``). When an example changes, regenerate its picture with
``python examples/NAME.py --out docs/img``."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = sorted((ROOT / "docs" / "img").glob("*.png"))


@pytest.mark.parametrize("png", IMAGES, ids=[p.stem for p in IMAGES])
def test_docs_picture_matches_its_example(png):
    Image = pytest.importorskip("PIL.Image")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from _common import source_digest
    finally:
        sys.path.pop(0)
    stamp = Image.open(png).text
    assert stamp.get("nngeometry-example") == png.stem, \
        f"{png.name} was not drawn by examples/{png.stem}.py: run it with --out docs/img"
    assert stamp.get("nngeometry-arguments") == "", \
        f"{png.name} comes from a smoke run ({stamp['nngeometry-arguments']}): run it in full"
    assert stamp.get("nngeometry-source-sha256") == source_digest(png.stem), \
        (f"examples/{png.stem}.py changed since {png.name} was drawn: regenerate it with "
         f"python examples/{png.stem}.py --out docs/img")


def test_every_docs_picture_has_an_example():
    assert IMAGES
    for png in IMAGES:
        assert (ROOT / "examples" / f"{png.stem}.py").exists(), png.name
