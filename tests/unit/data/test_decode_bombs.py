"""Inputs whose cost is not what their size says (issue 17, items 2, 3 and 11): a deflated DICOM
data set, a progressive JPEG with thousands of scans, a JPEG header claiming more than its data
holds; and a phone's MPO JPEG, which is an ordinary picture and must be read."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from covid_cxr.data.decode import MAX_JPEG_SCANS, DecodeError, decode_gray, jpeg_scans

RNG = np.random.default_rng(0)
PICTURE = (RNG.random((96, 96)) * 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _deflated_dicom(arr: np.ndarray, padding: int = 0) -> bytes:
    """A Part-10 file with transfer syntax 1.2.840.10008.1.2.1.99 (pydicom deflates the data set);
    `padding` zero bytes in a private OB element inflate to that much more."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.PhotometricInterpretation = "CR", "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    if padding:
        ds.add_new(0x00091010, "OB", b"\0" * padding)
    ds.PixelData = arr.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_deflated_dicom_is_read_and_a_deflate_bomb_is_refused_before_memory_is_spent():
    arr = (RNG.random((64, 64)) * 4095).astype(np.uint16)
    good = decode_gray(_deflated_dicom(arr), max_pixels=10_000)
    assert good.format == "DICOM" and good.pixels.shape == (64, 64)
    np.testing.assert_allclose(good.pixels, (arr - arr.min()) / (arr.max() - arr.min()), atol=1e-6)
    bomb = _deflated_dicom(arr, padding=64 * 2**20)  # 64 MiB of zeros: about 64 kB on the wire
    assert len(bomb) < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="deflate bomb"):
            decode_gray(bomb, max_pixels=10_000)  # cap: 4 bytes a pixel + 1 MiB
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB spent on a refused file"


def test_scan_bomb_is_refused_before_decoding_and_real_progressive_jpegs_are_read():
    progressive = _jpeg(PICTURE, progressive=True)
    scans, entropy, arithmetic = jpeg_scans(progressive)
    assert 1 < scans <= MAX_JPEG_SCANS and entropy > 0 and not arithmetic
    assert decode_gray(progressive).pixels.shape == (96, 96)
    assert jpeg_scans(_jpeg(PICTURE))[0] == 1  # baseline
    # the last scan repeated: libjpeg would decode the whole frame once per scan
    sos = progressive.rfind(b"\xff\xda")
    last = progressive[sos:-2]
    bomb = progressive[:-2] + last * (MAX_JPEG_SCANS + 50) + b"\xff\xd9"
    with pytest.raises(DecodeError, match="scans"):
        decode_gray(bomb)
    ok = progressive[:-2] + last * (MAX_JPEG_SCANS - scans) + b"\xff\xd9"
    assert jpeg_scans(ok)[0] == MAX_JPEG_SCANS
    decode_gray(ok)


def test_jpeg_header_claiming_more_than_its_data_holds_is_refused():
    small = bytearray(_jpeg(PICTURE[:16, :16]))
    sof = small.find(b"\xff\xc0")
    small[sof + 5:sof + 9] = (4472).to_bytes(2, "big") + (4472).to_bytes(2, "big")
    with pytest.raises(DecodeError, match="truncated JPEG"):
        decode_gray(bytes(small), target=(224, 224))
    # a real, nearly uniform picture of that size has enough coded data, and is read
    flat = _jpeg(np.full((2000, 2000), 128, np.uint8))
    assert decode_gray(flat, target=(224, 224)).width == 2000


def test_phone_mpo_jpeg_is_read_as_its_first_frame():
    buf = io.BytesIO()
    Image.fromarray(PICTURE).save(buf, "MPO", save_all=True, append_images=[Image.fromarray(255 - PICTURE)])
    dec = decode_gray(buf.getvalue())
    assert dec.format == "JPEG" and dec.pixels.shape == (96, 96)
    np.testing.assert_allclose(dec.pixels, decode_gray(_jpeg(PICTURE)).pixels, atol=0.02)
    assert abs(float(dec.pixels.mean()) - PICTURE.mean() / 255) < 0.02  # the first frame, not the second
    with pytest.raises(DecodeError, match="unsupported image format"):
        buf = io.BytesIO()
        Image.fromarray(PICTURE).save(buf, "GIF")
        decode_gray(buf.getvalue())
