"""One hostile input through `decode_gray` (target 224 x 224) in a fresh process: its outcome,
seconds and peak RSS. Run it with PYTHONPATH pointing at the tree to measure (before/after).

    python benchmarks/decode_bombs.py deflate|scan N|truncated|mpo
"""

from __future__ import annotations

import io
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stress_hostile import deflate_bomb, scan_bomb  # noqa: E402


def payload(kind: str, arg: int) -> bytes:
    if kind == "deflate":
        return deflate_bomb()  # 1 GiB of zeros in a 1 MB deflated DICOM
    if kind == "scan":
        return scan_bomb(repeats=arg)  # 4472 x 4472 progressive JPEG, last scan repeated
    buf = io.BytesIO()
    if kind == "truncated":  # 16 x 16 of data under a header claiming 4472 x 4472
        Image.fromarray((np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)).save(buf, "JPEG")
        data = bytearray(buf.getvalue())
        sof = data.find(b"\xff\xc0")
        data[sof + 5:sof + 9] = (4472).to_bytes(2, "big") * 2
        return bytes(data)
    img = Image.fromarray(np.zeros((512, 512), np.uint8))  # a phone's MPO: two frames
    img.save(buf, "MPO", save_all=True, append_images=[img])
    return buf.getvalue()


def main() -> None:
    kind = sys.argv[1]
    data = payload(kind, int(sys.argv[2]) if len(sys.argv) > 2 else 10_000)
    from covid_cxr.data.decode import DecodeError, decode_gray

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    try:
        d = decode_gray(data, target=(224, 224))
        outcome = f"decoded {d.width}x{d.height}"
    except DecodeError as exc:
        outcome = f"DecodeError: {exc}"
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{kind} ({len(data) // 1024} kB): {outcome[:100]} | {seconds:.2f} s | peak RSS {peak:.0f} MiB "
          f"(before decoding {before:.0f} MiB)")


if __name__ == "__main__":
    main()
