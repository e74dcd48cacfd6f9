"""The model bundle: a TensorFlow-Serving-style model repository, readable without training code.

    MODELS/<name>/<version>/  model.safetensors  model.onnx  metadata.json  report/

A bundle is assembled in a hidden temporary folder beside its final place and renamed into place,
so a crash never leaves half a model where a server could load it.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
ONNX_INPUT = "image"
ONNX_OUTPUT = "probabilities"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class BundleError(RuntimeError):
    pass


def valid_name(name: str) -> bool:
    """Model names are plain identifiers: no separators, no '..' (they become folder names)."""
    return bool(_NAME_RE.match(name)) and ".." not in name


def versions(model_dir: Path) -> list[int]:
    """Complete versions of one model (folders named by a positive integer holding metadata.json)."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / "metadata.json").is_file())


@dataclass
class Bundle:
    path: Path
    metadata: dict

    @property
    def name(self) -> str:
        return self.metadata["name"]

    @property
    def version(self) -> int:
        return int(self.metadata["version"])

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def input_hw(self) -> tuple[int, int]:
        spec = self.metadata["input"]
        return int(spec["height"]), int(spec["width"])

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    def session(self):
        """ONNX Runtime session for model.onnx (created once per Bundle)."""
        if getattr(self, "_session", None) is None:
            self._session = open_session(self.onnx_path)
        return self._session

    def predict(self, images: np.ndarray) -> np.ndarray:
        """N x H x W float [0, 1] (already resized to input_hw) -> N x classes probabilities."""
        x = np.asarray(images, dtype=np.float32)[..., None]
        return self.session().run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]

    def load_torch(self):
        """The classifier in PyTorch (for Grad-CAM and fine-grained checks), weights from safetensors."""
        from safetensors.torch import load_file

        from covid_cxr.models import create_model

        arch = self.metadata["architecture"]
        model, _ = create_model(arch["name"], weights="none", num_classes=len(self.classes),
                                hidden=arch["hidden"], dropout=arch["dropout"])
        model.load_state_dict(load_file(str(self.path / "model.safetensors")))
        return model.eval()


def load_bundle(path: str | Path, version: int | None = None) -> Bundle:
    """Open ``MODELS/<name>/<version>`` or ``MODELS/<name>`` (newest version, or `version`)."""
    path = Path(path)
    if not (path / "metadata.json").is_file():
        vs = versions(path)
        if not vs:
            raise BundleError(f"no model bundle at {path} (expected metadata.json or numbered versions)")
        if version is not None and version not in vs:
            raise BundleError(f"{path} has no version {version}; versions: {vs}")
        path = path / str(version or vs[-1])
    meta = json.loads((path / "metadata.json").read_text())
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(f"{path} has bundle format {meta['format_version']}; this covid-cxr reads <= {FORMAT_VERSION}")
    return Bundle(path, meta)


def export_onnx(model, path: Path, height: int, width: int) -> None:
    import torch  # here, not at the top: the ONNX Runtime server must not pay ~600 MB for torch

    from covid_cxr.models import ProbabilityModel

    wrapper = ProbabilityModel(model).eval()
    example = torch.rand(2, height, width, 1)
    torch.onnx.export(wrapper, (example,), str(path), input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                      dynamic_shapes={"images_nhwc": {0: torch.export.Dim("batch", min=1, max=1024)}},
                      dynamo=True, external_data=False, verbose=False)


def open_session(onnx_path: Path, threads: int = 0, spinning: bool = True):
    """An ONNX Runtime CPU session. `threads` 0: ONNX Runtime's default (all cores). A server turns
    `spinning` off so idle ORT threads do not steal the cores its event loop needs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def onnx_parity(model, onnx_path: Path, images: np.ndarray) -> float:
    """Largest absolute probability difference, PyTorch vs ONNX Runtime, on `images` (N x H x W)."""
    import torch

    x = images[..., None].astype(np.float32)
    sess = open_session(onnx_path)
    got = sess.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]
    with torch.no_grad():
        want = torch.softmax(model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)), 1).numpy()
    return float(np.abs(got - want).max())


def software_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("covid-cxr", "torch", "timm", "lightning", "onnx", "onnxruntime", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_bundle(models_dir: str | Path, name: str, model, metadata: dict, parity_images: np.ndarray,
                 report_dir: Path | None = None, max_parity_diff: float = 1e-4) -> Bundle:
    """Write the next version of `name` atomically; returns the bundle. Fails if ONNX disagrees."""
    from safetensors.torch import save_file

    if not valid_name(name):
        raise BundleError(f"invalid model name {name!r}")
    model_dir = Path(models_dir) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=model_dir, prefix=".tmp-"))
    tmp.chmod(0o755)
    try:
        model = model.eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "model.safetensors").chmod(0o644)
        h, w = metadata["input"]["height"], metadata["input"]["width"]
        export_onnx(model, tmp / "model.onnx", h, w)
        diff = onnx_parity(model, tmp / "model.onnx", parity_images)
        if not diff <= max_parity_diff:
            raise BundleError(f"ONNX export disagrees with PyTorch: max |dp| = {diff:.2e} > {max_parity_diff}")
        if report_dir is not None and Path(report_dir).is_dir():
            shutil.copytree(report_dir, tmp / "report")
        version = (versions(model_dir) or [0])[-1] + 1
        meta = {"format_version": FORMAT_VERSION, "name": name, "version": version, **metadata,
                "onnx": {"input": ONNX_INPUT, "output": ONNX_OUTPUT, "layout": "NHWC",
                         "parity_max_abs_diff": diff, "parity_images": int(len(parity_images))},
                "software": software_versions(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        final = model_dir / str(version)
        while True:  # another writer may take the same number: retry with the next one
            try:
                tmp.rename(final)
                break
            except OSError:
                if not final.exists():
                    raise
                version += 1
                meta["version"] = version
                (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
                final = model_dir / str(version)
        return Bundle(final, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
