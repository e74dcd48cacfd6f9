"""Decoding within memory and as a viewer would: large images are reduced while decoding (and the
cap still takes real radiographs), EXIF orientation, DICOM without a preamble, special files refused."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from covid_cxr.data.decode import DecodeError, decode_gray, load_for_model
from tests.unit.images import _dicom_bytes


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_large_images_decode_reduced_and_the_cap_takes_real_radiographs():
    side = 4300  # the largest real radiographs
    arr = np.zeros((side, side), np.uint8)
    arr[::8] = 200
    data = png(arr)
    dec = decode_gray(data, target=(64, 64))
    assert (dec.width, dec.height) == (side, side)
    assert dec.pixels.shape[0] < side // 10  # reduced before any float copy
    assert load_for_model(data, 64, 64).shape == (64, 64)
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_gray(png(np.zeros((4800, 4800), np.uint8)))  # 23 MP > the 20 MP default cap


def test_reduced_decoding_matches_full_resolution():
    y, x = np.mgrid[0:800, 0:800]
    arr = ((np.sin(x / 40) + np.cos(y / 55) + 2) / 4 * 255).astype(np.uint8)
    full = np.asarray(Image.fromarray(decode_gray(png(arr)).pixels, mode="F").resize((64, 64), Image.BILINEAR))
    assert np.abs(load_for_model(png(arr), 64, 64) - full).max() < 0.01


def test_exif_orientation_is_applied():
    img = Image.new("L", (128, 64), 0)
    img.paste(255, (0, 0, 64, 64))  # left half white
    exif = img.getexif()
    exif[0x0112] = 6  # the viewer turns it 90 degrees clockwise: the white half on top
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    px = load_for_model(buf.getvalue(), 64, 64)
    assert px[:24].mean() > 0.9 and px[40:].mean() < 0.1


def test_dicom_without_preamble_and_reduced_16_bit_dicom():
    arr = (np.indices((600, 600)).sum(0) * 3).astype(np.uint16)  # 12-bit values
    full = _dicom_bytes(arr)
    bare = full[132:]  # no 128-byte preamble, no 'DICM'
    assert bare[:2] == b"\x02\x00"
    np.testing.assert_array_equal(load_for_model(bare, 64, 64), load_for_model(full, 64, 64))
    dec = decode_gray(full, target=(64, 64))
    assert dec.format == "DICOM" and dec.width == 600 and dec.pixels.shape[0] < 600


def test_special_files_are_refused_not_read(tmp_path):
    from covid_cxr.data.manifest import scan_file

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(DecodeError, match="FIFO"):
        load_for_model(fifo, 64, 64)  # before the fix: blocked forever
    rec = scan_file(fifo, "x.png", "Normal")
    assert rec.status == "skipped" and "FIFO" in rec.reason
