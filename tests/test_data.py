"""Data stage on real X-rays: every layout, every bad-file kind, duplicates, splits, statistics."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_cxr.data import build_manifest, decode_gray, discover, normalise_class, prepare
from covid_cxr.data.decode import DecodeError
from tests.conftest import sample_images

REAL_DIRS = {"COVID-19": "COVID", "Normal": "Normal", "Viral Pneumonia": "Viral Pneumonia"}


def _real(data_dir: Path, n: int = 3) -> dict[str, list[Path]]:
    s = sample_images(data_dir, n)
    return {label: s[folder] for label, folder in REAL_DIRS.items()}


def _copy_layout(data_dir: Path, root: Path, layout: str, n: int = 3) -> Path:
    """Re-create the database's own layouts from real images."""
    names = {"release1": {"COVID-19": "COVID-19", "Normal": "NORMAL", "Viral Pneumonia": "Viral Pneumonia"},
             "release2": {"COVID-19": "COVID", "Normal": "Normal", "Viral Pneumonia": "Viral Pneumonia"},
             "plain": {"COVID-19": "covid", "Normal": "normal", "Viral Pneumonia": "viral_pneumonia"}}[layout]
    for label, files in _real(data_dir, n).items():
        d = root / names[label]
        if layout == "release2":
            (d / "masks").mkdir(parents=True)
            d = d / "images"
        d.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(files, 1):
            target = d / (f"{names[label]} ({i}).png" if layout == "release1" else f.name)
            shutil.copy(f, target)
            if layout == "release2":
                shutil.copy(f, root / names[label] / "masks" / f.name)  # masks must be ignored
    if layout == "release2":
        (root / "Lung_Opacity" / "images").mkdir(parents=True)
        shutil.copy(_real(data_dir, 1)["Normal"][0], root / "Lung_Opacity" / "images" / "Lung_Opacity-1.png")
    return root


@pytest.mark.parametrize("layout", ["release1", "release2", "plain"])
def test_every_layout_gives_the_same_classes(data_dir, tmp_path, layout):
    root = _copy_layout(data_dir, tmp_path / "ds", layout)
    d = discover(root)
    labels = sorted(f.label for f in d.files)
    assert labels == sorted(["COVID-19"] * 3 + ["Normal"] * 3 + ["Viral Pneumonia"] * 3)
    assert not any("masks" in f.relpath for f in d.files)
    if layout == "release2":
        assert d.excluded_classes == {"Lung_Opacity": 1}
        with_opacity = discover(root, ["COVID", "Normal", "Viral Pneumonia", "Lung_Opacity"])
        assert sum(f.label == "Lung_Opacity" for f in with_opacity.files) == 1


def test_wrapper_folder_is_descended(data_dir, tmp_path):
    root = _copy_layout(data_dir, tmp_path / "ds" / "COVID-19_Radiography_Dataset", "release2")
    assert len(discover(tmp_path / "ds").files) == 9 and root.is_dir()


def test_class_names_are_normalised():
    assert normalise_class("COVID") == normalise_class("covid-19") == normalise_class("COVID-19") == "COVID-19"
    assert normalise_class("NORMAL") == "Normal"
    assert normalise_class("viral_pneumonia") == normalise_class("Viral Pneumonia") == "Viral Pneumonia"


def test_missing_class_folder_is_a_clear_error(tmp_path):
    (tmp_path / "COVID").mkdir()
    with pytest.raises(FileNotFoundError, match="Normal"):
        discover(tmp_path)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decoding_png_modes_jpeg_and_dicom_agree(data_dir):
    src = Image.open(_real(data_dir, 1)["COVID-19"][0])
    ref = np.asarray(src.convert("L"), dtype=np.float32) / 255
    for mode in ("L", "RGB", "RGBA", "P"):
        got = decode_gray(_encode(src.convert(mode), "PNG")).pixels
        assert got.shape == ref.shape
        assert np.abs(got - ref).mean() < (0.02 if mode == "P" else 1e-3), mode
    sixteen = Image.fromarray((ref * 65535).astype(np.uint16))
    assert np.abs(decode_gray(_encode(sixteen, "PNG")).pixels - ref).max() < 1e-3
    jpeg = decode_gray(_encode(src.convert("L"), "JPEG", quality=95))
    assert jpeg.format == "JPEG" and np.abs(jpeg.pixels - ref).mean() < 0.02
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        # the same picture stored both ways: MONOCHROME1 stores it inverted, decoding undoes that
        dec = decode_gray(_dicom_bytes((ref * 4095).astype(np.uint16), photometric))
        assert dec.format == "DICOM"
        assert np.corrcoef(dec.pixels.ravel(), ref.ravel())[0, 1] > 0.999, photometric


def _dicom_bytes(arr: np.ndarray, photometric: str = "MONOCHROME2") -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.PhotometricInterpretation = "CR", photometric
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    stored = arr if photometric == "MONOCHROME2" else (4095 - arr)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG header claiming a huge image (decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_every_bad_file_is_skipped_with_its_reason(data_dir, tmp_path):
    root = _copy_layout(data_dir, tmp_path / "ds", "release2", n=4)
    bad = root / "COVID" / "images"
    good = (bad / sorted(p.name for p in bad.iterdir())[0]).read_bytes()
    (bad / "empty.png").write_bytes(b"")
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    (bad / "notes.txt").write_text("not an image")
    (bad / "fake.png").write_bytes(b"GIF89a" + b"\0" * 100)
    (bad / "bomb.png").write_bytes(_bomb_png(20000, 20000))
    (bad / "copy.png").write_bytes(good)  # exact duplicate
    man = build_manifest(root, progress=False)
    by = {Path(r.path).name: r for r in man.records}
    assert by["empty.png"].status == "skipped" and "empty" in by["empty.png"].reason
    assert by["truncated.png"].status == "skipped" and by["truncated.png"].reason
    assert by["notes.txt"].status == "skipped"
    assert by["fake.png"].status == "skipped"
    assert by["bomb.png"].status == "skipped" and "too many pixels" in by["bomb.png"].reason
    dup = [r for r in man.records if r.status == "duplicate"]
    assert len(dup) == 1 and "exact copy" in dup[0].reason
    assert sum(r.status == "ok" for r in man.records) == 12  # 4 per class, the copy not counted
    with pytest.raises(DecodeError):
        decode_gray(b"")


@pytest.fixture(scope="module")
def real_manifest(data_dir):
    return build_manifest(data_dir, progress=False)


def test_manifest_of_the_real_dataset(real_manifest):
    assert len(real_manifest.records) == 4137
    assert all(r.status == "ok" and len(r.sha256) == 64 and len(r.phash) == 16 for r in real_manifest.records)
    assert {r.label for r in real_manifest.records} == {"COVID-19", "Normal", "Viral Pneumonia"}


def test_group_aware_split_is_disjoint_stratified_and_keeps_near_duplicates_together(data_dir, real_manifest):
    p = prepare(data_dir, balance="weights", seed=3, manifest=real_manifest)
    paths = {s: {r.path for r in rs} for s, rs in p.splits.items()}
    assert not (paths["train"] & paths["val"]) and not (paths["train"] & paths["test"]) and not (paths["val"] & paths["test"])
    shas = {s: {r.sha256 for r in rs} for s, rs in p.splits.items()}
    assert not (shas["train"] & shas["test"])
    group_split = {}
    for s, rs in p.splits.items():
        for r in rs:
            assert group_split.setdefault(r.group, s) == s, "a near-duplicate group straddles splits"
    assert p.dedupe["near_groups"] > 0  # the real database has near duplicates: the check is live
    n = sum(len(rs) for rs in p.splits.values())
    assert n == 4137
    for c in p.classes:
        total = sum(r.label == c for rs in p.splits.values() for r in rs)
        assert abs(sum(r.label == c for r in p.splits["test"]) - 0.15 * total) <= 3
    again = prepare(data_dir, balance="weights", seed=3, manifest=real_manifest)
    assert [r.path for r in again.splits["test"]] == [r.path for r in p.splits["test"]]  # seeded
    assert p.class_weights[2] > p.class_weights[0]  # fewer Viral Pneumonia images -> heavier weight


def test_undersampling_as_the_study_did(data_dir, real_manifest):
    p = prepare(data_dir, balance="undersample", max_per_class=219, seed=0, manifest=real_manifest)
    totals = {c: sum(r.label == c for rs in p.splits.values() for r in rs) for c in p.classes}
    assert totals == {"COVID-19": 219, "Normal": 219, "Viral Pneumonia": 219}
    p2 = prepare(data_dir, balance="undersample", seed=0, manifest=real_manifest)
    assert {c: sum(r.label == c for rs in p2.splits.values() for r in rs) for c in p2.classes} == \
        {c: 1137 for c in p2.classes}


def test_normalisation_comes_from_the_training_split_only(data_dir, real_manifest):
    from covid_cxr.data.decode import decode_file

    p = prepare(data_dir, balance="undersample", max_per_class=30, seed=1, manifest=real_manifest)
    px = np.concatenate([decode_file(data_dir / r.path).pixels.ravel() for r in p.splits["train"]])
    assert p.mean == pytest.approx(px.mean(), abs=1e-4)
    assert p.std == pytest.approx(px.std(), abs=1e-4)
    test_px = np.concatenate([decode_file(data_dir / r.path).pixels.ravel() for r in p.splits["test"]])
    assert abs(test_px.mean() - p.mean) > 1e-5  # differs from the test split's own statistics


def test_duplicate_counts_reach_the_prepared_data(data_dir, tmp_path):
    root = _copy_layout(data_dir, tmp_path / "ds", "release1", n=8)
    first = next((root / "NORMAL").iterdir())
    shutil.copy(first, root / "NORMAL" / "NORMAL (99).png")
    assert discover(root).layout.startswith("release-1")
    p = prepare(root, balance="none", seed=0, progress=False)
    assert p.dedupe["exact_duplicates"] == 1
    assert p.describe()["exact_duplicates_removed"] == 1
