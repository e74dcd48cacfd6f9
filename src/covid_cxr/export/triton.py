"""`covid-cxr export --format triton`: a Triton Inference Server model repository from bundles.

    REPO/<name>/config.pbtxt            platform onnxruntime_onnx, dynamic batching, tensors from metadata.json
    REPO/<name>/labels.txt              class names, one a line, in output order (label_filename)
    REPO/<name>/<version>/model.onnx    the bundle's ONNX model, unchanged (with its external data files, if any)
    REPO/<name>/<version>/model.py      --backend python only: runs model.onnx on ONNX Runtime

Two variants: `onnxruntime` (the default; Triton's onnxruntime backend, e.g. GPU Triton) and `python`
(Triton's python backend running model.onnx through ONNX Runtime: for a Triton without the onnxruntime
backend, such as the CPU-only server in the nvidia-pytriton wheel). Same tensors, same answers.

Triton, and KServe's Triton runtime, load this as it is. The exported model takes what the ONNX
graph takes: FP32 [N, H, W, 1] in [0, 1], already resized (see the input's dims); decoding image
files (BYTES) is our server's job, not the graph's. The tensors come from `metadata.onnx`, so
outputs a bundle adds (out-of-distribution scores) appear here without a change.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from covid_cxr.bundle import Bundle, BundleError, check_bundle, valid_name, versions
from covid_cxr.bundle.schema import DYNAMIC, BundleMetadata, TensorSpec
from covid_cxr.export.tensors import triton_type

PLATFORM = "onnxruntime_onnx"
BACKENDS = ("onnxruntime", "python")
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")  # copied as <version>/model.py
LABELS = "labels.txt"
ENUM_FIELDS = {"data_type", "format", "kind"}  # written bare in the text format, not quoted


def _tensor(t: TensorSpec, batched: bool) -> dict:
    dims = t.shape[1:] if batched else t.shape
    out = {"name": t.name, "data_type": triton_type(t.dtype), "dims": dims or [1]}
    if batched and not dims:  # a per-image scalar, [N]: Triton wants dims [1] reshaped to []
        out["reshape"] = {"shape": []}
    return out


def model_config(meta: BundleMetadata, max_batch_size: int = 64, max_queue_delay_us: int = 5000,
                 all_versions: bool = False, backend: str = "onnxruntime", name: str | None = None) -> dict:
    """Triton's ModelConfig (as a dict in its protobuf field names) for one bundle's ONNX model, run by
    Triton's onnxruntime backend or (`backend="python"`) by model.py on ONNX Runtime, on CPUs.
    `name`: the model folder's name, which Triton requires `name` to equal (default: metadata's)."""
    batched = all(t.shape[0] == DYNAMIC for t in (*meta.onnx.inputs, *meta.onnx.outputs))
    inputs = [_tensor(t, batched) for t in meta.onnx.inputs]
    for t in inputs:
        if len(t["dims"]) == 3:
            t["format"] = "FORMAT_NHWC"
    outputs = [_tensor(t, batched) for t in meta.onnx.outputs]
    for t in outputs:
        if t["name"] == "probabilities":
            t["label_filename"] = LABELS
    if backend not in BACKENDS:
        raise BundleError(f"--backend {backend!r}: one of {', '.join(BACKENDS)}")
    engine = {"platform": PLATFORM} if backend == "onnxruntime" else {"backend": "python"}
    config = {"name": name or meta.name, **engine, "max_batch_size": max_batch_size if batched else 0,
              "version_policy": {"all": {}} if all_versions else {"latest": {"num_versions": 1}},
              "input": inputs, "output": outputs}
    if batched:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": max_queue_delay_us}
    if backend == "python":
        config["instance_group"] = [{"count": 1, "kind": "KIND_CPU"}]
    return config


def _value(key: str, v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return v if key in ENUM_FIELDS else json.dumps(v)


def to_pbtxt(msg: dict, indent: int = 0) -> str:
    """A ModelConfig dict in protobuf's text format (what config.pbtxt is)."""
    pad = "  " * indent
    lines = []
    for key, v in msg.items():
        if isinstance(v, dict):
            lines.append(f"{pad}{key} {{\n{to_pbtxt(v, indent + 1)}{pad}}}")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            items = ",\n".join(f"{pad}  {{\n{to_pbtxt(m, indent + 2)}{pad}  }}" for m in v)
            lines.append(f"{pad}{key} [\n{items}\n{pad}]")
        elif isinstance(v, list):
            lines.append(f"{pad}{key}: [ {', '.join(_value(key, x) for x in v)} ]")
        else:
            lines.append(f"{pad}{key}: {_value(key, v)}")
    return "".join(line + "\n" for line in lines)


def external_data(onnx_path: Path) -> list[str]:
    """Files an ONNX model keeps its tensors in beside it (ONNX external data: `weights.bin`), as
    relative paths; BundleError for a location outside the model's folder."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found = []
    for t in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            rel = Path(loc)
            if not loc or rel.is_absolute() or ".." in rel.parts or not (onnx_path.parent / rel).is_file():
                raise BundleError(f"{onnx_path}: external data {loc!r} is not a file inside the bundle")
            found.append(rel.as_posix())
    return sorted(set(found))


def _tensors(graph):
    """Every tensor of a graph: initializers, and those in node attributes and subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(g)


def _write_model(bundles: list[Bundle], dest: Path, max_batch_size: int, all_versions: bool,
                 backend: str = "onnxruntime") -> None:
    newest = bundles[-1].metadata
    dest.mkdir(parents=True)
    config = model_config(newest, max_batch_size, all_versions=all_versions, backend=backend, name=dest.name)
    (dest / "config.pbtxt").write_text(f"# covid-cxr export of {dest.name} ({newest.name} in its metadata), "
                                       f"newest version {newest.version}\n" + to_pbtxt(config), encoding="utf-8")
    (dest / LABELS).write_text("".join(c + "\n" for c in newest.classes), encoding="utf-8")
    for b in bundles:
        same = (b.classes, b.metadata.onnx.inputs, b.metadata.onnx.outputs)
        if same != (newest.classes, newest.onnx.inputs, newest.onnx.outputs):  # one config.pbtxt for all
            raise BundleError(f"{b.path}: classes or input differ from version {newest.version}; "
                              "export the newest version alone")
        (dest / str(b.version)).mkdir()
        shutil.copyfile(b.onnx_path, dest / str(b.version) / "model.onnx")
        if backend == "python":
            shutil.copyfile(PYTHON_MODEL, dest / str(b.version) / "model.py")
        for rel in external_data(b.onnx_path):  # Triton reads them beside model.onnx
            (dest / str(b.version) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(b.onnx_path.parent / rel, dest / str(b.version) / rel)


def _replace(staged: Path, final: Path) -> None:
    """Put a fully written model folder in place (the old one, if any, goes after)."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{staged.parent.name}")
        final.rename(old)
    staged.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_triton(models: str | Path, out: str | Path, names: list[str] | None = None,
                  all_versions: bool = False, max_batch_size: int = 64, backend: str = "onnxruntime") -> list[Path]:
    """Export each model of the repository `models` (or those in `names`) to `out`; returns the
    model folders written. Every bundle is checked first (`covid-cxr bundle check`)."""
    if backend not in BACKENDS:
        raise BundleError(f"--backend {backend!r}: one of {', '.join(BACKENDS)}")
    models, out = Path(models), Path(out)
    found = sorted(p.name for p in models.iterdir() if valid_name(p.name) and versions(p)) if models.is_dir() else []
    names = names or found
    missing = [n for n in names if n not in found]
    if not names or missing:
        raise BundleError(f"{models}: no model {missing or ''} here (found: {found or 'none'})")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        vs = versions(models / name) if all_versions else versions(models / name)[-1:]
        bundles = [check_bundle(models / name / str(v)) for v in vs]
        for b in bundles:
            if b.metadata.lung_crop is not None:  # Triton would run model.onnx on whole images
                raise BundleError(f"{b.path}: trained on lung-only input (--lung-crop), which Triton cannot "
                                  "apply before model.onnx; serve it with `covid-cxr serve` (name the others)")
        staged = Path(tempfile.mkdtemp(dir=out, prefix=f".tmp-{name}-"))
        try:
            _write_model(bundles, staged / name, max_batch_size, all_versions, backend)  # named as Triton will see it
            _replace(staged / name, out / name)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        written.append(out / name)
    return written
