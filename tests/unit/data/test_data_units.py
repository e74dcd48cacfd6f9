"""Data stage without the dataset: decoding every format, layouts, the group-aware split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_cxr.data import decode_gray, discover, normalise_class
from covid_cxr.data.decode import DecodeError, load_batch
from covid_cxr.data.manifest import Record
from covid_cxr.data.split import SPLITS, select, stratified_group_split
from covid_cxr.core.errors import DataError, UserError
from tests.unit.images import _bomb_png, _dicom_bytes, _encode


def _picture(size: int = 64) -> np.ndarray:
    """A smooth grayscale picture with structure (so modes and codecs can be compared)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    return (0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy)).astype(np.float32)


def test_png_modes_jpeg_and_dicom_decode_to_the_same_picture():
    ref = _picture()
    src = Image.fromarray((ref * 255).round().astype(np.uint8))
    ref = np.asarray(src, dtype=np.float32) / 255
    for mode in ("L", "RGB", "RGBA", "P"):
        got = decode_gray(_encode(src.convert(mode), "PNG")).pixels
        assert got.shape == ref.shape and np.abs(got - ref).mean() < (0.02 if mode == "P" else 1e-3), mode
    sixteen = Image.fromarray((ref * 65535).astype(np.uint16))
    assert np.abs(decode_gray(_encode(sixteen, "PNG")).pixels - ref).max() < 1e-3
    jpeg = decode_gray(_encode(src, "JPEG", quality=95))
    assert jpeg.format == "JPEG" and np.abs(jpeg.pixels - ref).mean() < 0.02
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        dec = decode_gray(_dicom_bytes((ref * 4095).astype(np.uint16), photometric))
        assert dec.format == "DICOM" and np.corrcoef(dec.pixels.ravel(), ref.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("data, reason", [(b"", "empty"), (b"GIF89a" + b"\0" * 64, "not a PNG, JPEG or DICOM"),
                                          (_bomb_png(20_000, 20_000), "too many pixels")])
def test_bad_bytes_are_decode_errors_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_gray(data)
    assert issubclass(DecodeError, ValueError)


def test_load_batch_stacks_resized_images(tmp_path):
    paths = []
    for i, size in enumerate((40, 64, 90)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((_picture(size) * 255).astype(np.uint8)).save(paths[-1])
    x = load_batch(paths, 32, 48)
    assert x.shape == (3, 32, 48) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1


def _write_layout(root: Path, layout: str, n: int = 2) -> Path:
    names = {"release1": ("COVID-19", "NORMAL", "Viral Pneumonia"), "release2": ("COVID", "Normal", "Viral Pneumonia"),
             "plain": ("covid", "normal", "viral_pneumonia")}[layout]
    for name in names:
        d = root / name / ("images" if layout == "release2" else "")
        d.mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            file = f"{name} ({i}).png" if layout == "release1" else f"{name}-{i}.png"
            Image.fromarray((_picture(32) * 255 * i / n).astype(np.uint8)).save(d / file)
    if layout == "release2":
        (root / "COVID" / "masks").mkdir()
        Image.new("L", (8, 8)).save(root / "COVID" / "masks" / "COVID-1.png")
    return root


@pytest.mark.parametrize("layout", ["release1", "release2", "plain"])
def test_every_layout_gives_the_three_classes(tmp_path, layout):
    found = discover(_write_layout(tmp_path / "ds", layout))
    labels = sorted({f.label for f in found.files})
    assert labels == ["COVID-19", "Normal", "Viral Pneumonia"] and len(found.files) == 6  # masks/ ignored


def test_class_names_are_normalised():
    assert normalise_class("COVID") == normalise_class("covid-19") == normalise_class("COVID-19") == "COVID-19"
    assert normalise_class("NORMAL") == "Normal"
    assert normalise_class("viral_pneumonia") == normalise_class("Viral Pneumonia") == "Viral Pneumonia"


def test_missing_class_folder_is_a_clear_user_error(tmp_path):
    (tmp_path / "COVID").mkdir()
    with pytest.raises(FileNotFoundError, match="Normal") as err:
        discover(tmp_path)
    assert isinstance(err.value, UserError)


def _records(per_class: dict[str, int], group_size: int = 2) -> list[Record]:
    out, g = [], 0
    for label, n in per_class.items():
        for i in range(n):
            if i % group_size == 0:
                g += 1
            out.append(Record(path=f"{label}/{i}.png", label=label, group=g))
    return out


def test_split_is_stratified_disjoint_and_keeps_groups_together():
    recs = _records({"COVID-19": 60, "Normal": 80, "Viral Pneumonia": 40})
    split = stratified_group_split(recs, (0.7, 0.15, 0.15), seed=0)
    assert set(split.assignment) == {r.path for r in recs}
    by_group: dict[int, set[str]] = {}
    for r in recs:
        by_group.setdefault(r.group, set()).add(split.assignment[r.path])
    assert all(len(s) == 1 for s in by_group.values())
    for label, n in (("COVID-19", 60), ("Normal", 80)):
        assert abs(split.counts["train"][label] - 0.7 * n) <= 2
    assert split.assignment == stratified_group_split(recs, (0.7, 0.15, 0.15), seed=0).assignment
    assert set(SPLITS) == set(split.counts)


def test_undersampling_takes_whole_groups_to_the_smallest_class():
    chosen = select(_records({"COVID-19": 60, "Normal": 80, "Viral Pneumonia": 40}), balance="undersample")
    counts = {c: sum(r.label == c for r in chosen) for c in ("COVID-19", "Normal", "Viral Pneumonia")}
    assert set(counts.values()) == {40}


def test_bad_split_fractions_are_a_data_error():
    with pytest.raises(DataError, match="sum to 1"):
        stratified_group_split(_records({"COVID-19": 4}), (0.5, 0.2, 0.2))
