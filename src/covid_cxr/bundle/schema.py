"""The typed contract of a bundle's `metadata.json` (format 2), checked on every load.

Everything a server, a reviewer or a later stage needs to use or judge the model lives here, without
the training code: architecture and weight source, classes, input spec (read from the decode
module's constants), normalisation, the training configuration and history, test metrics, and the
exported ONNX graph's tensors. `docs/bundle.schema.json` is this model's JSON Schema
(`covid-cxr bundle schema > docs/bundle.schema.json`; a test keeps the file current).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from covid_cxr.data import decode
from covid_cxr.core.lung_config import CROP_DILATE, CROP_MARGIN, MAX_AREA, MIN_AREA, MIN_BLOB_SHARE, LungConfig
from covid_cxr.core.config import TrainConfig
from covid_cxr.core.results import MaskMetrics, Metrics, OperatingPoint

FORMAT_VERSION = 2
ONNX_INPUT = "image"
ONNX_OUTPUT = "probabilities"
OOD_OUTPUTS = ("ood_score", "in_distribution")  # present when the bundle has an out-of-distribution gate
TRUST_FILE = "trust.safetensors"  # optional: temperature and OOD statistics as arrays (also inside model.onnx)
ONNX_MASK = "mask"  # a segmentation bundle's output: N x H x W x 1 probability of the foreground (lung)
DYNAMIC = -1  # a tensor dimension whose size is chosen per call (the batch)
CAM_FILE = "cam.onnx"  # optional: Grad-CAM maps as an ONNX graph (`cam`), so explaining needs no torch
CAM_OUTPUT = "cam"  # cam.onnx's output: N x classes x H x W, one map in [0, 1] per class
LUNGS_FOLDER = "lungs"  # a --lung-crop classifier's own copy of its lung model (metadata.json, model.onnx)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Member(_Strict):
    """One model of an ensemble: where it came from, and what rebuilds it (weights are in the
    ensemble's model.safetensors under `members.<i>.`)."""

    name: str
    version: PositiveInt
    architecture: "Architecture"
    normalisation: "Normalisation"
    temperature: float = Field(1.0, gt=0, description="the member's calibration: its logits are divided by it")
    test_accuracy: float | None = None


class Architecture(_Strict):
    name: str = Field(description="covid-cxr architecture name (registry key)")
    timm_name: str = Field(description="timm model the backbone is built from")
    weights: str = Field(description="where the backbone's weights came from")
    hidden: list[PositiveInt] = Field(description="head hidden layer sizes")
    dropout: float = Field(ge=0, lt=1)
    cam_layer: str = Field(description="backbone module whose activations Grad-CAM uses")
    frozen_backbone: bool = True
    members: list[Member] | None = Field(None, description="an ensemble's models (their probabilities are averaged)")


class Normalisation(_Strict):
    mean: float
    std: float = Field(gt=0)
    applied: Literal["inside the model"] = "inside the model"
    computed_on: str = "train split"


class InputSpec(_Strict):
    """One grayscale image as the model takes it; the server decodes and resizes to this."""

    height: PositiveInt
    width: PositiveInt
    channels: Literal[1] = decode.CHANNELS
    layout: Literal["NHWC"] = "NHWC"
    dtype: Literal["float32"] = "float32"
    value_range: tuple[float, float] = decode.VALUE_RANGE
    color: str = decode.COLOR
    resize: str = decode.RESIZE_METHOD
    normalisation: Normalisation


class TensorSpec(_Strict):
    name: str
    dtype: Literal["float32"] = "float32"
    shape: list[int] = Field(description=f"{DYNAMIC} marks a dimension chosen per call (the batch)")


class OnnxInfo(_Strict):
    file: Literal["model.onnx"] = "model.onnx"
    opset: PositiveInt | None = Field(None, description="default-domain opset (unknown for format-1 bundles)")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parity_max_abs_diff: float = Field(ge=0, description="largest |p_torch - p_onnx| on parity_images images")
    parity_images: int = Field(ge=0)


class CamInfo(_Strict):
    """`cam.onnx`: the same image input as model.onnx (after `Bundle.prepare`), out one Grad-CAM map
    per class, computed in closed form from the last feature map and the head
    (covid_cxr.explain.camgraph) and checked against pytorch-grad-cam when the bundle was written."""

    file: Literal["cam.onnx"] = CAM_FILE
    method: Literal["gradcam"] = "gradcam"
    layer: str = Field(description="the Grad-CAM layer(s): the feature map the head pools")
    target: str = Field(description="the score whose gradient weighs the channels")
    opset: PositiveInt
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parity_max_abs_diff: float = Field(ge=0, description="largest |map_onnx - map_pytorch_grad_cam| over every "
                                       "class of parity_images images (maps in [0, 1])")
    parity_images: int = Field(ge=0)


class PrecisionVariant(_Strict):
    """One lower-precision way of running the bundle (`covid-cxr bundle precision`), measured against
    the bundle's own fp32 answers (ONNX Runtime) on its validation split; it serves only if accepted."""

    runtime: Literal["openvino"] = "openvino"
    precision: str = Field(description="bf16 | bf16-split (head and gate fp32) | int8 (NNCF; gate unquantized)")
    measured_on: str = Field("val split", description="the images compared")
    n: int = Field(ge=0, description="images compared")
    changed_predictions: int = Field(ge=0, description="images whose decided label differs from fp32's")
    changed_gate: int | None = Field(None, ge=0, description="images whose gate verdict differs (with "
                                     "gate_threshold where set); None without a gate")
    changed_gate_as_written: int | None = Field(None, ge=0, description="gate verdicts changed at the "
                                                "threshold in model.onnx (before any refit)")
    gate_threshold: float | None = Field(None, description="the gate's threshold refitted on this variant's "
                                         "validation scores (accepting as many as fp32 does); None: as written")
    max_abs_diff: float = Field(ge=0, description="largest |p_variant - p_fp32| over every class and image")
    rule: str = Field(description="what acceptance required")
    accepted: bool
    file: str | None = Field(None, pattern=r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*(/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*$",
                             description="the variant's own model file in the bundle (int8: OpenVINO IR)")
    software: dict[str, str] = {}
    measured: datetime

    def summary(self) -> str:
        gate = "" if self.changed_gate is None else f", {self.changed_gate}/{self.n} gate verdicts changed " \
            f"({self.changed_gate / max(self.n, 1):.1%})"
        return (f"{self.changed_predictions}/{self.n} predictions changed "
                f"({self.changed_predictions / max(self.n, 1):.1%}){gate} on the {self.measured_on}")


class DataDescription(_Strict):
    dataset_root: str
    layout: str
    manifest_sha256: str
    files_found: int
    files_skipped: int
    exact_duplicates_removed: int
    duplicates: dict[str, int] = {}
    balance: str
    max_per_class: int | None = None
    seed: int
    split_fractions: list[float]
    counts: dict[str, dict[str, int]] = Field(description="split -> class -> images")
    class_weights: list[float] | None = None
    sources: dict[str, dict[str, dict[str, int]]] | None = Field(None, description="source -> split -> class -> "
                                                                 "images, when the data came from several folders")
    normalisation: dict[str, Any] | None = Field(None, description="as in input.normalisation (older bundles)")


class HistorySummary(_Strict):
    epochs_run: int = Field(ge=0)
    best_epoch: int = Field(ge=0)
    best_val_acc: float | None = None
    lr_range_test_suggestion: float | None = None


class Training(_Strict):
    config: TrainConfig
    data: DataDescription
    history: HistorySummary
    feature_cache: bool
    timings_s: dict[str, float] = Field(description="seconds per step; 'total' covers the whole run")


class Calibration(_Strict):
    temperature: float = Field(gt=0, description="logits are divided by it inside model.onnx")
    fitted_on: str = "val split"
    val_nll_before: float | None = None
    val_nll_after: float | None = None


class OODStage(_Strict):
    name: str = Field(description="'pooled' (the head's input) or the backbone module whose output it summarises")
    statistics: str = Field(description="what the block holds, e.g. channel means and standard deviations")
    dim: int = Field(ge=1, description="the block's width")
    scale: float = Field(gt=0, description="its distances are divided by it (its validation quantile)")
    shrinkage: float | None = Field(None, description="Ledoit-Wolf shrinkage of its covariance")


class OODGate(_Strict):
    method: str = Field(description="how ood_score is computed (see covid_cxr.trust.ood): 'mahalanobis' "
                                    "(pooled features) or 'mahalanobis-stages' (Lee et al. 2018's feature ensemble)")
    threshold: float = Field(description="ood_score above it: in_distribution = 0")
    accept_target: float = Field(gt=0, le=1, description="share of the validation split accepted")
    val_accept_rate: float | None = None
    test_accept_rate: float | None = None
    combine: str | None = Field(None, description="how the stages' scores make ood_score (mahalanobis-stages)")
    stages: list[OODStage] | None = Field(None, description="the feature blocks scored (mahalanobis-stages)")
    score: str | None = Field(None, description="the score in words")
    fitted_on: str | None = None
    threshold_on: str | None = None
    n_train: int | None = Field(None, ge=0, description="images the statistics were fitted on")
    feature_dim: int | None = Field(None, ge=1)
    member_thresholds: list[float] | None = Field(None, description="an ensemble's members' own thresholds")


class SitePrevalence(_Strict):
    """A site's class prevalence, estimated on its unlabelled films (`train --init-from ...
    --site-unlabelled DIR`); model.onnx answers with it: log(prevalence / training prior) is added to
    the tempered logits (the head's last bias), Saerens et al. 2002."""

    prevalence: dict[str, float] = Field(description="class -> the site's estimated share of films")
    training_prior: dict[str, float] = Field(description="class -> the prior the head answered with before")
    images: int = Field(ge=1, description="unlabelled films it was estimated on")
    skipped: int = Field(0, ge=0, description="unreadable files left out")
    method: str = "EM on temperature-calibrated answers (Saerens, Latinne & Decaestecker 2002)"


class TrustInfo(_Strict):
    """Calibration and the out-of-distribution gate; both live inside model.onnx (covid_cxr.trust)."""

    calibration: Calibration | None = None
    ood: OODGate | None = None
    prevalence: SitePrevalence | None = None

class ImageReference(_Strict):
    """Cheap statistics of the reference images, one value per image (rounded): the file's own side
    and aspect, and brightness, contrast, sharpness and border brightness at the model's input size."""

    side: list[float] = Field(description="the file's shorter side, pixels")
    aspect: list[float] = Field(description="the file's width / height")
    brightness: list[float] = Field(description="mean pixel value in [0, 1]")
    contrast: list[float] = Field(description="standard deviation of the pixel values")
    sharpness: list[float] = Field(description="mean absolute difference of neighbouring pixels")
    border: list[float] = Field(description="mean pixel value of the outer 8 % frame (padding, crops)")
    histogram: list[float] = Field(description="mean intensity histogram, 16 equal bins over [0, 1]")
    bit_depth: dict[str, int] = Field(description="bits per sample -> images")
    dicom: dict[str, dict[str, int]] = Field({}, description="DICOM Modality, Manufacturer, ViewPosition and "
                                             "PatientAge (decades) -> images, where the files are DICOM")


class SiteReference(_Strict):
    """What a new site is compared against (`covid-cxr site check`, the serving monitor): the
    validation split's answers and image statistics, as samples (no images, no patient data)."""

    computed_on: str = "val split"
    n: int = Field(ge=1, description="images in the reference")
    ood_score: list[float] | None = Field(None, description="the gate's ood_score per image (absent without a gate)")
    confidence: list[float] = Field(description="the largest class probability per image")
    predicted: dict[str, int] | None = Field(None, description=(
        "predicted class -> images; absent where the reference's mix is not the site's (an adapted "
        "bundle's labelled films are chosen per class, so their mix says nothing of its prevalence)"))
    images: ImageReference | None = None


class SegmentationHistory(_Strict):
    epochs_run: int = Field(ge=0)
    best_epoch: int = Field(ge=0)
    best_val_dice: float | None = None


class SanityLimits(_Strict):
    """What a plausible mask looks like; a mask outside these is an out-of-distribution signal."""

    min_area: float = MIN_AREA
    max_area: float = MAX_AREA
    min_blob_share: float = MIN_BLOB_SHARE
    blobs: int = 2


class SegmentationData(_Strict):
    """The lung-mask pairs a segmentation bundle was trained on, and its split."""

    dataset_root: str
    manifest_sha256: str
    pairs: int = Field(ge=0)
    skipped: int = Field(ge=0)
    duplicate_groups: int = Field(ge=0)
    split_fractions: list[float]
    seed: int
    counts: dict[str, dict[str, int]] = Field(description="split -> source -> pairs")
    test_ids: list[str] = Field(description="the test split's pair ids (`lungs evaluate --held-out`)")


class Segmentation(_Strict):
    """A segmentation bundle's training record and test figures (task == "segmentation")."""

    config: LungConfig
    threshold: float = Field(0.5, gt=0, lt=1, description="mask = probability >= threshold")
    data: SegmentationData
    history: SegmentationHistory
    test_metrics: MaskMetrics | None = Field(None, description="on the test split, at the images' own size")
    sanity: SanityLimits = SanityLimits()
    timings_s: dict[str, float] = {}


class LungCrop(_Strict):
    """Lung-only input (`covid-cxr train --lung-crop`): the classifier learnt from images cropped
    to their lungs, so every reader crops the same way before model.onnx (`Bundle.prepare`): the
    image, resized to `input`, is segmented by the lung model in the bundle's `lungs/` folder (copied
    in when the bundle was written, so the bundle is self-contained), then cropped to the lungs' box
    (`box`) or blacked out outside the lungs (`mask`). An image whose mask fails the lung sanity
    check goes through whole, as in training."""

    mode: Literal["box", "mask"]
    folder: Literal["lungs"] = Field(LUNGS_FOLDER, description="sub-folder holding the lung model's "
                                     "metadata.json and model.onnx")
    margin: float = Field(CROP_MARGIN, ge=0, le=1, description="box: share of the lungs' box side added on every side")
    dilate: float = Field(CROP_DILATE, ge=0, le=1, description="mask: the lung mask widened by this share of the image side")
    lungs_from: str = Field(description="the lung bundle it was copied from (name vN, path at training)")
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of lungs/model.onnx (`bundle check` compares)")


def decide(probs, index: int | None, threshold: float | None):
    """Predicted class indices: `index` where its probability >= threshold, else the argmax.
    (numpy; here so the ONNX-only server applies a bundle's operating point without more imports)"""
    import numpy as np

    probs = np.asarray(probs)
    pred = probs.argmax(1)
    if index is None or threshold is None:
        return pred
    return np.where(probs[:, index] >= threshold, index, pred)


class LungCropRequest(_Strict):
    """What a --lung-crop classifier's writer is given: the crop mode and the lung bundle to copy in."""

    mode: Literal["box", "mask"]
    lungs: str = Field(description="the lung segmentation bundle (MODELS/<name>[/<version>])")


class Distillation(_Strict):
    """Where a distilled model's soft labels came from (`--distil-from`, the accurate recipe's student)."""

    name: str = Field(description="the teacher bundle's name")
    version: PositiveInt = Field(description="the teacher bundle's version")
    architecture: str = Field(description="the teacher's architecture ('ensemble' for an ensemble)")
    members: list[str] = Field([], description="an ensemble teacher's member architectures")
    temperature: float = Field(gt=0, description="the temperature both sides were softened by")
    soft_weight: float = Field(ge=0, le=1, description="the soft labels' share of the loss")
    teacher_test_accuracy: float | None = Field(None, description="the teacher's accuracy on the shared test split")


class BundleContent(_Strict):
    """What a bundle's writer is given (covid_cxr.publish.writer.write_bundle): the model's half of
    metadata.json. The writer adds name, version, onnx, cam, software and created, copies the lung
    model in (`lung_crop`) and times the record; made typed where training, ensembling or
    distillation assembles it, so a wrong field fails there, before any export."""

    task: Literal["classification", "segmentation"] = "classification"
    architecture: Architecture
    classes: list[str] = Field(min_length=2)
    input: InputSpec
    training: Training | None = None
    test_metrics: Metrics | None = None
    operating_point: OperatingPoint | None = None
    trust: TrustInfo | None = None
    segmentation: Segmentation | None = None
    lung_crop: LungCropRequest | None = None
    site_reference: SiteReference | None = None
    distilled_from: Distillation | None = None


Member.model_rebuild()


class BundleMetadata(_Strict):
    """`metadata.json` of MODELS/<name>/<version>/.

    task "classification" (the default, and every format-1 bundle): output `probabilities`
    [-1, classes]. task "segmentation": output `mask` [-1, H, W, 1] (probability of `classes[1]`),
    `segmentation` holds its training record; `training` and `test_metrics` stay empty."""

    format_version: Literal[2] = FORMAT_VERSION
    task: Literal["classification", "segmentation"] = "classification"
    name: str
    version: PositiveInt
    architecture: Architecture
    classes: list[str] = Field(min_length=2, description="output order of the probabilities")
    input: InputSpec
    training: Training | None = None
    test_metrics: Metrics | None = None
    operating_point: OperatingPoint | None = Field(None, description="decision threshold (--target-recall)")
    onnx: OnnxInfo
    trust: TrustInfo | None = Field(None, description="absent in bundles written before covid-cxr had it")
    segmentation: Segmentation | None = None
    lung_crop: LungCrop | None = Field(None, description="lung-only input: the classifier needs its lung "
                                       "model's crop first (absent: whole images)")
    site_reference: SiteReference | None = Field(None, description="what `covid-cxr site check` and the serving "
                                                 "monitor compare a site against (absent in older bundles)")
    cam: CamInfo | None = Field(None, description="Grad-CAM inside the bundle (cam.onnx); absent in bundles "
                                "written before it, and where the closed form does not hold")
    precision_variants: dict[str, PrecisionVariant] | None = Field(
        None, description="lower precisions measured against this bundle's fp32 answers (`covid-cxr bundle "
        "precision`); only accepted ones serve; absent: none measured")
    distilled_from: Distillation | None = Field(None, description="the teacher whose soft labels trained it "
                                                "(absent: trained on the true labels alone)")
    software: dict[str, str] = {}
    created: datetime

    @model_validator(mode="after")
    def _consistent(self) -> BundleMetadata:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes repeat: {self.classes}")
        want_in = [DYNAMIC, self.input.height, self.input.width, self.input.channels]
        if [t.shape for t in self.onnx.inputs[:1]] != [want_in]:
            raise ValueError(f"onnx.inputs[0].shape must be {want_in} (from 'input')")
        outs = {t.name: t.shape for t in self.onnx.outputs}
        name, want_out = self.output_name, self.output_shape
        if outs.get(name) != want_out:
            raise ValueError(f"onnx output {name!r} must have shape {want_out}")
        if (self.task == "segmentation") != (self.segmentation is not None):
            raise ValueError("'segmentation' is required for task segmentation and only there")
        if self.has_ood and any(outs.get(n) != [DYNAMIC] for n in OOD_OUTPUTS):
            raise ValueError(f"trust.ood is set: onnx outputs {list(OOD_OUTPUTS)} must have shape [{DYNAMIC}]")
        if self.lung_crop is not None and self.task != "classification":
            raise ValueError("lung_crop belongs to classifiers only")
        ref = self.site_reference
        if ref is not None and not set(ref.predicted or {}) <= set(self.classes):
            raise ValueError(f"site_reference.predicted names classes the model lacks: {sorted(ref.predicted)}")
        if self.cam is not None and self.task != "classification":  # its shapes: checked against the file
            raise ValueError("cam (cam.onnx) belongs to classifiers only")
        for key, variant in (self.precision_variants or {}).items():
            if key != variant.precision:
                raise ValueError(f"precision_variants.{key} holds a measurement of {variant.precision!r}")
        if self.operating_point is not None and self.operating_point.class_name not in self.classes:
            raise ValueError(f"operating_point.class_name {self.operating_point.class_name!r} is not a class")
        return self

    @property
    def has_ood(self) -> bool:
        return self.trust is not None and self.trust.ood is not None

    @property
    def output_name(self) -> str:
        return ONNX_MASK if self.task == "segmentation" else ONNX_OUTPUT

    @property
    def output_shape(self) -> list[int]:
        if self.task == "segmentation":
            return [DYNAMIC, self.input.height, self.input.width, 1]
        return [DYNAMIC, len(self.classes)]

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.input.height, self.input.width


def onnx_tensors(height: int, width: int, n_classes: int, ood: bool = False, task: str = "classification"
                 ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The exported model's input and output tensors: a classifier's probabilities (with the OOD
    gate's outputs when `ood`), or a segmentation model's mask."""
    if task == "segmentation":
        outs = [TensorSpec(name=ONNX_MASK, shape=[DYNAMIC, height, width, 1])]
    else:
        outs = [TensorSpec(name=ONNX_OUTPUT, shape=[DYNAMIC, n_classes])]
        outs += [TensorSpec(name=n, shape=[DYNAMIC]) for n in OOD_OUTPUTS] if ood else []
    return [TensorSpec(name=ONNX_INPUT, shape=[DYNAMIC, height, width, decode.CHANNELS])], outs


def cam_tensors(height: int, width: int, n_classes: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """cam.onnx's tensors: model.onnx's image in, one map per class out."""
    ins = [TensorSpec(name=ONNX_INPUT, shape=[DYNAMIC, height, width, decode.CHANNELS])]
    return ins, [TensorSpec(name=CAM_OUTPUT, shape=[DYNAMIC, n_classes, height, width])]


def upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """A format-1 metadata dict (the first release) in format 2's shape; format 2 passes through."""
    if raw.get("format_version") != 1:
        return raw
    old_t = dict(raw.get("training") or {})
    hist_keys = ("epochs_run", "best_epoch", "best_val_acc", "lr_range_test_suggestion")
    inp = raw["input"]
    ins, outs = onnx_tensors(int(inp["height"]), int(inp["width"]), len(raw["classes"]))
    onnx = raw.get("onnx", {})
    training = None
    if old_t:
        training = {"config": old_t.pop("hyperparameters", {}),
                    "history": {k: old_t.pop(k, None) for k in hist_keys},
                    "feature_cache": bool(old_t.pop("feature_cache", True)),
                    "timings_s": raw.get("timings_s", {}), "data": old_t}
        training["history"]["epochs_run"] = training["history"]["epochs_run"] or 0
        training["history"]["best_epoch"] = training["history"]["best_epoch"] or 0
        old_t.pop("normalisation", None)  # kept in input.normalisation
    return {"format_version": 2, "task": "classification", "name": raw["name"], "version": raw["version"],
            "architecture": raw["architecture"], "classes": raw["classes"],
            "input": {k: v for k, v in inp.items() if k in InputSpec.model_fields},
            "training": training, "test_metrics": raw.get("test_metrics"),
            "onnx": {"inputs": [t.model_dump() for t in ins], "outputs": [t.model_dump() for t in outs],
                     "parity_max_abs_diff": onnx.get("parity_max_abs_diff", 0.0),
                     "parity_images": onnx.get("parity_images", 0)},
            "software": raw.get("software", {}), "created": raw["created"]}


def json_schema() -> str:
    """The JSON Schema of format 2, as committed in docs/bundle.schema.json."""
    schema = BundleMetadata.model_json_schema()
    schema["$id"] = "https://github.com/covid-cxr/covid-cxr/docs/bundle.schema.json"
    schema["title"] = "covid-cxr model bundle metadata.json (format 2)"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
