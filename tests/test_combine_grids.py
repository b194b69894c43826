"""benchmarks/combine_grids.py: panels side by side, column crop, height scaling, clear errors."""
import importlib.util
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("combine_grids", ROOT / "benchmarks" / "combine_grids.py")
combine = importlib.util.module_from_spec(spec)
spec.loader.exec_module(combine)


def _png(path, size, colour):
    Image.new("RGB", size, colour).save(path)
    return path


def test_side_by_side_with_name_band(tmp_path):
    a = _png(tmp_path / "a.png", (80, 40), "red")
    b = _png(tmp_path / "b.png", (40, 60), "blue")
    out = combine.combine_grids([("a", a), ("b", b)], tmp_path / "o.png", gap=10, band=16)
    im = Image.open(out)
    assert im.size == (80 + 10 + 40, 16 + 60)
    assert im.getpixel((5, 16 + 5)) == (255, 0, 0)
    assert im.getpixel((95, 16 + 50)) == (0, 0, 255)
    assert im.getpixel((85, 16 + 5)) == (255, 255, 255)  # the gap


def test_columns_and_height(tmp_path):
    a = _png(tmp_path / "a.png", (80, 40), "red")
    out = combine.combine_grids([("a", a)], tmp_path / "o.png", band=0, columns=(1, 4), height=20)
    assert Image.open(out).size == (10, 20)  # 80 * 1/4 = 20 wide, then halved


def test_bad_input(tmp_path):
    a = _png(tmp_path / "a.png", (8, 8), "red")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        combine.combine_grids([("x", tmp_path / "missing.png")], tmp_path / "o.png")
    with pytest.raises(ValueError, match="K/N"):
        combine.combine_grids([("a", a)], tmp_path / "o.png", columns=(5, 4))
    with pytest.raises(ValueError, match="at least one"):
        combine.combine_grids([], tmp_path / "o.png")
