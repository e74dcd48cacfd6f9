"""Write a bundle (needs torch): weights, ONNX export checked for parity, validated metadata,
assembled in a hidden folder and renamed into place so a crash never leaves half a model."""

from __future__ import annotations

import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from covid_cxr.bundle.card import write_card
from covid_cxr.bundle.reader import Bundle, BundleError, open_session
from covid_cxr.bundle.schema import (
    CAM_FILE,
    CAM_OUTPUT,
    ONNX_INPUT,
    ONNX_MASK,
    ONNX_OUTPUT,
    OOD_OUTPUTS,
    TRUST_FILE,
    BundleContent,
    BundleMetadata,
    CamInfo,
    LungCrop,
    LungCropRequest,
    OnnxInfo,
    cam_tensors,
    onnx_tensors,
)
from covid_cxr.bundle.store import discard, new_staging_dir, publish, valid_name
from covid_cxr.core.files import Stopwatch, atomic_write_text
from covid_cxr.models.loading import load_torch
from covid_cxr.models.onnx import OPSET, export_graph

MAX_PARITY_DIFF = 1e-4
MAX_CAM_DIFF = 1e-3  # cam.onnx vs pytorch-grad-cam, maps in [0, 1] (measured: ~1e-6 on real X-rays)


def exported_module(model, trust=None, task: str = "classification"):
    """What model.onnx computes: the study's probabilities, or (with a `covid_cxr.trust.fit.Trust`)
    temperature-scaled probabilities plus the out-of-distribution score and verdict; a segmentation
    model (lungs.model.MaskModel) as it is (NHWC in, mask out)."""
    from covid_cxr.models import ProbabilityModel

    if task == "segmentation":
        return model.eval()
    if trust is None:
        return ProbabilityModel(model).eval()
    from covid_cxr.trust.ood import trusted_module

    return trusted_module(model, trust.temperature, trust.ood)


def export_onnx(model, path: Path, height: int, width: int, trust=None, task: str = "classification") -> int:
    """Export N x H x W x 1 -> probabilities [, ood_score, in_distribution] (or a mask); returns the
    default-domain opset."""
    import onnx
    import torch  # here, not at the top: the ONNX Runtime server must not pay ~600 MB for torch

    wrapper = exported_module(model, trust, task)
    example = torch.rand(2, height, width, 1)
    names = [ONNX_OUTPUT, *(OOD_OUTPUTS if trust is not None and trust.ood is not None else ())]
    if task == "segmentation":
        names = [ONNX_MASK]
    export_graph(wrapper, example, path, [ONNX_INPUT], names)
    graph = onnx.load(str(path), load_external_data=False)
    if task == "segmentation":  # the exporter leaves the upsampled mask's H and W unknown: state them
        dims = graph.graph.output[0].type.tensor_type.shape.dim
        for d, size in zip(dims[1:], (height, width, 1)):
            d.dim_value = size
        onnx.save(graph, str(path))
    opsets = {o.domain: o.version for o in graph.opset_import}
    return int(opsets.get("", opsets.get("ai.onnx", 0)))


def onnx_parity(model, onnx_path: Path, images: np.ndarray, trust=None, task: str = "classification") -> float:
    """Largest absolute probability difference, PyTorch vs ONNX Runtime, on `images` (N x H x W);
    with an OOD gate, its score must also agree (relative 1e-3)."""
    import torch

    x = images[..., None].astype(np.float32)
    session = open_session(onnx_path)
    got = session.run(None, {ONNX_INPUT: x})
    with torch.no_grad():
        want = exported_module(model.eval(), trust, task)(torch.from_numpy(x))
    want = [t.numpy() for t in (want if isinstance(want, tuple) else (want,))]
    if len(want) > 1:
        score_diff = np.abs(got[1] - want[1]).max() / max(1.0, float(np.abs(want[1]).max()))
        if not score_diff <= 1e-3:
            raise BundleError(f"{onnx_path}: ood_score disagrees with PyTorch (relative {score_diff:.2e})")
    return float(np.abs(got[0] - want[0]).max())


def export_cam(model, folder: Path, parity_images: np.ndarray) -> CamInfo | None:
    """Write folder/cam.onnx (Grad-CAM of every class as an ONNX graph, covid_cxr.explain.camgraph)
    and check it against pytorch-grad-cam on `parity_images`, every class; None (no file) where the
    closed form does not hold for this architecture. BundleError if the maps disagree."""
    import onnx
    import torch

    from covid_cxr.explain.camgraph import CamGraph, cam_target, closed_form_holds
    from covid_cxr.explain.gradcam import Explainer

    h, w = parity_images.shape[1:]
    if not closed_form_holds(model, h, w):
        return None
    classes = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features  # the head's
    path = folder / CAM_FILE
    export_graph(CamGraph(model, h, w).eval(), torch.rand(2, h, w, 1), path, [ONNX_INPUT], [CAM_OUTPUT])
    graph = onnx.load(str(path), load_external_data=False)
    for d, size in zip(graph.graph.output[0].type.tensor_type.shape.dim[1:], (classes, h, w)):
        d.dim_value = size  # the exporter leaves them unknown: state them, as metadata.json does
    onnx.save(graph, str(path))
    path.chmod(0o644)
    images = np.ascontiguousarray(parity_images, dtype=np.float32)
    got = open_session(path).run([CAM_OUTPUT], {ONNX_INPUT: images[..., None]})[0]
    explainer = Explainer(model)
    try:
        want = np.stack([np.stack([e.cam for e in explainer.explain(images, c)]) for c in range(classes)], axis=1)
    finally:
        explainer.close()
    diff = float(np.abs(np.clip(got, 0.0, 1.0) - want).max())
    if not diff <= MAX_CAM_DIFF:
        raise BundleError(f"{path}: Grad-CAM maps disagree with pytorch-grad-cam: max |d| = {diff:.2e} > {MAX_CAM_DIFF}")
    opsets = {o.domain: o.version for o in graph.opset_import}
    ins, outs = cam_tensors(h, w, classes)
    return CamInfo(layer=model.spec.cam_layer, target=cam_target(model), opset=int(opsets.get("", OPSET)),
                   inputs=ins, outputs=outs, parity_max_abs_diff=diff, parity_images=len(images))


def save_trust(trust, path: Path) -> None:
    """The temperature and OOD statistics that model.onnx holds as constants, also as plain arrays
    (numpy-readable: a check, a re-export or another engine can use them without parsing the graph)."""
    from safetensors.numpy import save_file

    arrays = {"temperature": np.array([trust.temperature], np.float64)}
    if trust.ood is not None:
        arrays.update(trust.ood.arrays())
    save_file(arrays, str(path))
    path.chmod(0o644)


def source_commit() -> str | None:
    """The git commit of the covid-cxr source that runs ('-dirty' with uncommitted changes), or None
    outside a git checkout (an installed wheel): what a model card's "how to reproduce" names."""
    import subprocess

    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def software_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    commit = source_commit()
    if commit:
        out["covid-cxr commit"] = commit
    for pkg in ("covid-cxr", "torch", "timm", "lightning", "onnx", "onnxruntime", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _metadata(content: BundleContent, name: str, version: int, onnx: OnnxInfo, cam: CamInfo | None,
              lung_crop: LungCrop | None, clock: Stopwatch | None) -> BundleMetadata:
    meta = {**dict(content), "lung_crop": lung_crop, "cam": cam, "name": name, "version": version, "onnx": onnx,
            "software": software_versions(), "created": datetime.now(timezone.utc).replace(microsecond=0)}
    record = "segmentation" if content.task == "segmentation" else "training"
    if clock is not None and meta[record] is not None:
        clock.lap("bundle")
        meta[record] = meta[record].model_copy(update={"timings_s": clock.summary()})
    return BundleMetadata.model_validate(meta)


def embed_lungs(staging: Path, request: LungCropRequest) -> LungCrop:
    """Copy the lung model a --lung-crop classifier needs into its bundle (`lungs/`: metadata.json
    and model.onnx, checked first), so the bundle is servable anywhere without the lung bundle it
    was trained with; returns metadata's `lung_crop`."""
    from covid_cxr.bundle.check import check_bundle
    from covid_cxr.bundle.schema import LUNGS_FOLDER
    from covid_cxr.core.files import file_sha256

    src = check_bundle(request.lungs)
    if src.metadata.task != "segmentation":
        raise BundleError(f"{src.path}: a {src.metadata.task} model, not a lung segmentation model")
    dest = staging / LUNGS_FOLDER
    dest.mkdir()
    for name in ("metadata.json", src.metadata.onnx.file):
        shutil.copyfile(src.path / name, dest / name)
        (dest / name).chmod(0o644)
    return LungCrop(mode=request.mode, lungs_from=f"{src.name} v{src.version} ({src.path})",
                    onnx_sha256=file_sha256(dest / src.metadata.onnx.file))


def publish_version(staging: Path, model_dir: Path, make_metadata) -> Bundle:
    """Publish `staging` as the next version of `model_dir`: metadata.json (`make_metadata(version)`)
    and its model card are written into the version folder before it appears, for every bundle
    this module writes."""
    box: dict[str, BundleMetadata] = {}

    def write_metadata(folder: Path, version: int) -> None:
        box["meta"] = make_metadata(version)
        atomic_write_text(folder / "metadata.json", box["meta"].model_dump_json(indent=2) + "\n")
        write_card(folder, box["meta"])  # MODEL_CARD.md/.html: from metadata.json and report/ alone

    version = publish(staging, model_dir, write_metadata)
    return Bundle(model_dir / str(version), box["meta"])


def write_bundle(models_dir: str | Path, name: str, model, content: BundleContent, parity_images: np.ndarray,
                 report_dir: Path | None = None, clock: Stopwatch | None = None, trust=None) -> Bundle:
    """Write the next version of `name`; returns the bundle. `content` is the model's half of the
    metadata (its lung_crop's lung model is copied in); `trust` (covid_cxr.trust.fit.Trust) puts the
    temperature and OOD gate into model.onnx. This adds the rest. Fails (and publishes nothing) if
    the ONNX model disagrees with PyTorch or the metadata is invalid."""
    from safetensors.torch import save_file

    if not valid_name(name):
        raise BundleError(f"{name}: invalid model name (letters, digits, '_', '-', '.'; no '..')")
    model_dir = Path(models_dir) / name
    staging = new_staging_dir(model_dir)
    try:
        model = model.eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging / "model.safetensors"))
        (staging / "model.safetensors").chmod(0o644)
        h, w, task = content.input.height, content.input.width, content.task
        opset = export_onnx(model, staging / "model.onnx", h, w, trust, task)
        diff = onnx_parity(model, staging / "model.onnx", parity_images, trust, task)
        if not diff <= MAX_PARITY_DIFF:
            raise BundleError(f"{staging / 'model.onnx'}: disagrees with PyTorch: max |dp| = {diff:.2e} > {MAX_PARITY_DIFF}")
        if trust is not None:
            save_trust(trust, staging / TRUST_FILE)
        cam = export_cam(model, staging, parity_images) if task == "classification" else None
        ood = content.trust is not None and content.trust.ood is not None
        ins, outs = onnx_tensors(h, w, len(content.classes), ood=ood, task=task)
        onnx = OnnxInfo(opset=opset, inputs=ins, outputs=outs, parity_max_abs_diff=diff,
                        parity_images=len(parity_images))
        if report_dir is not None and Path(report_dir).is_dir():
            shutil.copytree(report_dir, staging / "report")
        crop = embed_lungs(staging, content.lung_crop) if content.lung_crop is not None else None
        return publish_version(staging, model_dir, lambda v: _metadata(content, name, v, onnx, cam, crop, clock))
    except BaseException:
        discard(staging)
        raise


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Deterministic smooth random images (noise on a coarse grid, blown up): parity inputs whose
    Grad-CAM maps are not flat, where no X-rays are at hand."""
    from covid_cxr.data.decode import resize

    rng = np.random.default_rng(seed)
    return np.stack([np.clip(resize(rng.random((8, 8)).astype(np.float32), h, w), 0, 1) for _ in range(n)])


def add_cam(path: str | Path, version: int | None = None) -> Bundle:
    """Publish the bundle's next version with cam.onnx (Grad-CAM in the graph), so a server explains
    it without torch: the same files, copied, plus the graph from its own weights, checked against
    pytorch-grad-cam. No retraining; the old version stays as it was."""
    from covid_cxr.bundle.reader import load_bundle

    src = load_bundle(path, version)
    if src.metadata.task != "classification" or src.has_cam:
        raise BundleError(f"{src.path}: " + ("already has cam.onnx" if src.has_cam else "not a classifier"))
    model = load_torch(src)
    model_dir = src.path.parent
    staging = new_staging_dir(model_dir)
    try:
        for item in src.path.iterdir():
            if item.name != "metadata.json":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        cam = export_cam(model, staging, smooth_images(8, *src.input_hw))
        if cam is None:
            raise BundleError(f"{src.path}: Grad-CAM layer {src.metadata.architecture.cam_layer!r} is not the "
                              "feature map the head pools: no closed form (explain it with `covid-cxr explain`)")
        base = {**src.metadata.model_dump(mode="json"), "cam": cam.model_dump(mode="json")}
        return publish_version(staging, model_dir, lambda v: BundleMetadata.model_validate({**base, "version": v}))
    except BaseException:
        discard(staging)
        raise
