"""No ONNX Runtime call is larger than `max_batch`: through the micro-batcher, unbatched, and for
OIP named outputs."""

from __future__ import annotations

import asyncio

import numpy as np


def test_no_onnx_call_is_larger_than_max_batch():
    from concurrent.futures import ThreadPoolExecutor

    from covid_cxr.serve.batching import MicroBatcher

    sizes = []

    def run(x):
        sizes.append(len(x))
        return x.reshape(len(x), -1)[:, :2] * 2

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(run, pool, max_batch=4, max_wait_s=0.001)
            x = np.arange(10 * 4, dtype=np.float32).reshape(10, 2, 2, 1)
            out = await b.submit(x)
            await b.close()
            return x, out

    x, out = asyncio.run(main())
    assert max(sizes) <= 4 and sum(sizes) == 10
    np.testing.assert_array_equal(out, x.reshape(10, -1)[:, :2] * 2)  # in order


def test_unbatched_model_also_splits(tiny_models):
    from covid_cxr.bundle import load_bundle
    from covid_cxr.serve.repository import LoadedModel

    sizes = []

    class Session:
        def run(self, names, feeds):  # probabilities, then the trust outputs when the bundle has them
            n = len(feeds["image"])
            sizes.append(n)
            return [np.zeros((n, 3), np.float32)] + [np.zeros(n, np.float32) for _ in names[1:]]

    m = LoadedModel("tiny", 1, load_bundle(tiny_models / "tiny"), Session(), max_batch=4)
    out = asyncio.run(m.predict(np.zeros((9, 64, 64, 1), np.float32)))
    assert out.shape == (9, 3) and sizes == [4, 4, 1]


def test_oip_named_outputs_are_split_too(tiny_models):
    from covid_cxr.bundle import load_bundle
    from covid_cxr.serve.repository import LoadedModel
    from covid_cxr.serve.routes.oip import _outputs

    sizes = []

    class Session:
        def run(self, names, feeds):
            sizes.append(len(feeds["image"]))
            return [np.zeros((len(feeds["image"]), 3), np.float32) for _ in names]

    m = LoadedModel("tiny", 1, load_bundle(tiny_models / "tiny"), Session(), max_batch=4)
    out = asyncio.run(_outputs(m, np.zeros((6, 64, 64, 1), np.float32), ["probabilities", "other"]))
    assert sizes == [4, 2] and out["other"].shape == (6, 3)
