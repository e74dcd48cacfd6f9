"""Issue 17: does an image get the same answer by every door? Runs on any revision (CLI and HTTP only),
so the same command measures before and after a change.

For each model in MODELS it sends every PNG under IMAGES through offline `predict --json` (the
reference), TF Serving REST (with_ood), v2 infer with tritonclient's default request (BYTES, no
`outputs`), v2 with `outputs` named (FP32 in JSON), the upload API and the web page's call
(Grad-CAM on), and `explain` (its printed table, 3 decimals); it prints the largest probability
difference to predict and how many gate verdicts differ. Then: whether v2 infers are counted in
the batcher's metrics, and what v2 answers to strings, booleans and deeply nested JSON.

    python benchmarks/doors_probe.py --models MODELS --images FOLDER [--json out.json] [--explain-only]
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import requests


def offline(models: Path, name: str, files: list[Path]) -> dict:
    out = subprocess.run([sys.executable, "-m", "covid_cxr", "predict", *map(str, files), "--model",
                          str(models / name), "--json"], capture_output=True, text=True)
    return {Path(r["image"]).name: (list(r["probabilities"].values()), r["in_distribution"], r["label"],
                                    r["probabilities"][r["label"]]) for r in json.loads(out.stdout)["results"]}


def tf(url: str, name: str, f: Path) -> tuple:
    body = {"signature_name": "with_ood", "instances": [{"b64": base64.b64encode(f.read_bytes()).decode()}]}
    p = requests.post(f"{url}/v1/models/{name}:predict", json=body, timeout=60).json()["predictions"][0]
    return p["probabilities"], p["in_distribution"]


def v2(client, name: str, f: Path, hw, named: bool) -> tuple:
    import tritonclient.http as http

    from covid_cxr.data.decode import load_for_model

    if named:
        x = load_for_model(f, *hw)[None, :, :, None]
        inp = http.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        res = client.infer(name, [inp], outputs=[http.InferRequestedOutput(n, binary_data=False) for n in
                                                 ("probabilities", "ood_score", "in_distribution")])
    else:
        inp = http.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([f.read_bytes()], dtype=object))
        res = client.infer(name, [inp])
    return res.as_numpy("probabilities")[0].tolist(), bool(res.as_numpy("in_distribution")[0])


def upload(url: str, name: str, f: Path, web: bool) -> tuple:
    params = {"model": name, **({"gradcam": "true"} if web else {})}
    j = requests.post(f"{url}/api/v1/predict", params=params, files={"file": (f.name, f.read_bytes())},
                      timeout=120).json()
    return list(j["probabilities"].values()), j.get("in_distribution")


def explain(models: Path, name: str, files: list[Path]) -> dict:
    """explain's printed 'predicted (p)' (3 decimals) and whether it shows the gate's NO."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-m", "covid_cxr", "explain", *map(str, files), "--model",
                              str(models / name), "--out", tmp, "--no-progress"], capture_output=True, text=True,
                             env={**__import__("os").environ, "COLUMNS": "300"}).stdout
    found = {}
    for line in out.splitlines():
        m = re.search(r"│\s*(.+?\.png)\s*│\s*(.+?) \(([0-9.]+)\)\s*│(.*)", line)
        if m:
            found[Path(m.group(1)).name] = (m.group(2).strip(), float(m.group(3)), "NO" in m.group(4))
    return found


def doors_table(url: str, models: Path, files: list[Path]) -> list[dict]:
    import tritonclient.http as http

    from covid_cxr.bundle import load_bundle

    client = http.InferenceServerClient(url=url.removeprefix("http://"))
    rows = []
    for name in sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")):
        b = load_bundle(models / name)
        ref = offline(models, name, files)
        doors = {"tf-serving": {f.name: tf(url, name, f) for f in files},
                 "v2, no outputs (tritonclient default)": {f.name: v2(client, name, f, b.input_hw, False) for f in files},
                 "v2, outputs named": {f.name: v2(client, name, f, b.input_hw, True) for f in files},
                 "upload API": {f.name: upload(url, name, f, False) for f in files},
                 "web page (Grad-CAM on)": {f.name: upload(url, name, f, True) for f in files}}
        for door, got in doors.items():
            dp = max(abs(a - r) for k in ref for a, r in zip(got[k][0], ref[k][0]))
            rows.append({"model": name, "door": door, "max_abs_dp": dp,
                         "gate_diffs": sum(got[k][1] != ref[k][1] for k in ref)})
        rows.append(explain_row(models, name, files, ref))
    client.close()
    return rows


def explain_row(models: Path, name: str, files: list[Path], ref: dict | None = None) -> dict:
    """explain's printed label and its probability against predict's (3 decimals; 1 where the label
    differs or the image is missing), and its gate."""
    ref = ref or offline(models, name, files)
    ex = explain(models, name, files)
    dp = max(abs(ex[k][1] - ref[k][3]) if k in ex and ex[k][0] == ref[k][2] else 1.0 for k in ref)
    gates = sum((k not in ex) or (ex[k][2] != (ref[k][1] is False)) for k in ref)
    return {"model": name, "door": "explain (printed, 3 decimals)", "max_abs_dp": dp, "gate_diffs": gates}


def batcher_counts(url: str, models: Path, files: list[Path]) -> dict:
    import tritonclient.http as http

    from covid_cxr.bundle import load_bundle

    name = sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith("."))[0]
    b = load_bundle(models / name)

    def counted() -> float:
        m = re.search(rf'covid_cxr_batch_size_sum{{model="{name}",version="\d+"}} ([0-9.e+]+)',
                      requests.get(f"{url}/metrics", timeout=30).text)
        return float(m.group(1)) if m else 0.0

    client = http.InferenceServerClient(url=url.removeprefix("http://"))
    before = counted()
    for f in files:
        v2(client, name, f, b.input_hw, False)
    client.close()
    return {"v2 infers (no outputs)": len(files), "images counted in covid_cxr_batch_size": counted() - before}


def strictness(url: str, models: Path) -> dict:
    from covid_cxr.bundle import load_bundle

    name = sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith("."))[0]
    h, w = load_bundle(models / name).input_hw

    def body(data) -> bytes:
        return json.dumps({"inputs": [{"name": "image", "shape": [1, h, w, 1], "datatype": "FP32",
                                       "data": data}]}).encode()

    deep = "[" * 100_000 + "]" * 100_000
    cases = {"FP32 numbers": body([0.5] * (h * w)), "FP32 strings": body(["0.5"] * (h * w)),
             "FP32 booleans": body([True] * (h * w)),
             "deep JSON (100,000 brackets) as data": body([0.5]).replace(b"[0.5]", deep.encode()),
             "deep JSON (100,000 brackets) as the body": deep.encode()}
    out = {}
    for case, data in cases.items():
        r = requests.post(f"{url}/v2/models/{name}/infer", data=data, timeout=60)
        try:
            kind = "JSON {error}" if set(r.json()) == {"error"} else "JSON"
        except ValueError:
            kind = f"not JSON ({len(r.content)} bytes)"
        out[case] = f"{r.status_code} {kind}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--explain-only", action="store_true", help="only the explain row (no server)")
    args = ap.parse_args()
    from covid_cxr.serve.settings import ServeSettings
    from covid_cxr.serve.testing import running_server

    files = sorted(args.images.rglob("*.png"))
    if args.explain_only:  # no server: the offline doors only
        for name in sorted(p.name for p in args.models.iterdir() if p.is_dir() and not p.name.startswith(".")):
            r = explain_row(args.models, name, files)
            print(f"| {name} | {r['door']} | {r['max_abs_dp']:.2g} | {r['gate_diffs']} / {len(files)} |")
        return
    with running_server(ServeSettings(models=args.models, rescan_seconds=5)) as url:
        result = {"doors": doors_table(url, args.models, files), "batcher": batcher_counts(url, args.models, files),
                  "strictness": strictness(url, args.models)}
    print("| model | door | max abs. difference to predict | gate verdicts that differ |\n|---|---|---|---|")
    for r in result["doors"]:
        print(f"| {r['model']} | {r['door']} | {r['max_abs_dp']:.2g} | {r['gate_diffs']} / {len(files)} |")
    print(json.dumps({k: v for k, v in result.items() if k != "doors"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
