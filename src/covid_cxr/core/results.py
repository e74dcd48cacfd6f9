"""Typed results of evaluation: made where they are computed (evaluate.metrics), read by the reports,
the bundle's metadata (`test_metrics`), the CLI and the trackers. Strict (an unknown key is an error
where it is made, not a KeyError three layers later); the JSON keeps the shape metrics.json had."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Interval = tuple[float, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassInterval(_Strict):
    """Bootstrap intervals of one class's figures."""

    precision: Interval
    recall: Interval
    f1: Interval


class ClassMetrics(_Strict):
    precision: float
    recall: float
    f1: float
    support: int = Field(ge=0)
    recall_ci95: Interval | None = Field(None, description="Wilson 95 % interval of the recall")
    roc_auc: float | None = Field(None, description="one class against the rest (None: the class is absent or alone)")
    ci: ClassInterval | None = None


class BootstrapInterval(_Strict):
    accuracy: Interval
    macro_f1: Interval
    method: str


class ReliabilityBin(_Strict):
    lo: float
    hi: float
    n: int = Field(ge=0)
    confidence: float | None = None
    accuracy: float | None = None


class Reliability(_Strict):
    n_bins: int = Field(ge=1)
    bins: list[ReliabilityBin]


class CalibrationFigures(_Strict):
    ece: float
    brier: float


class CoverageRow(_Strict):
    accuracy: float
    images: int = Field(ge=0)
    min_confidence: float


class GateSelection(_Strict):
    accepted_share: float
    accuracy_accepted: float | None = None
    accuracy_rejected: float | None = None


class Selective(_Strict):
    """Selective prediction (evaluate/selective.py): risk-coverage area and accuracy per coverage."""

    aurc: float
    full_coverage_accuracy: float
    at_coverage: dict[str, CoverageRow]
    gate: GateSelection | None = None


class OperatingPoint(_Strict):
    """Decision rule: `class_name` when its probability >= threshold, otherwise the argmax."""

    class_name: str
    threshold: float = Field(ge=0, le=1)
    target_recall: float = Field(gt=0, le=1)
    val_recall: float = Field(ge=0, le=1, description="that class's recall on the validation split at the threshold")
    val_images: int = Field(ge=0)
    fitted_on: str = "validation split"
    rule: Literal["quantile", "conformal"] = Field("quantile", description="quantile: the target met on the "
                                                   "validation images; conformal: met on new images of the same "
                                                   "population with probability >= confidence (Beta order statistic)")
    confidence: float | None = Field(None, gt=0, lt=1, description="conformal: the probability wanted")
    confidence_reached: float | None = Field(None, ge=0, le=1, description="conformal: what val_images allow "
                                             "(below confidence when there are too few)")
    batch: int | None = Field(None, ge=1, description="conformal: the target holds on each batch of this many new "
                              "images of the class (beta-binomial); None: on the population")


class OperatingPointResult(OperatingPoint):
    """The rule and the test metrics with it applied."""

    metrics: Metrics

    def rule_only(self) -> OperatingPoint:
        return OperatingPoint(**self.model_dump(exclude={"metrics"}))


class Metrics(_Strict):
    """A labelled set's figures: the study's per-class table with intervals, calibration, and what
    later steps add (temperature, gate rate, operating point, per source, selective prediction)."""

    n: int = Field(ge=0)
    accuracy: float
    accuracy_ci95: Interval | None = None
    macro_f1: float | None = None
    classes: list[str]
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]
    ece: float | None = None
    brier: float | None = None
    reliability: Reliability | None = None
    ci: BootstrapInterval | None = None
    temperature: float | None = Field(None, description="the scaling the probabilities were measured with")
    before_temperature: CalibrationFigures | None = None
    ood_rate: float | None = Field(None, description="share the out-of-distribution gate rejects")
    operating_point: OperatingPointResult | None = None
    by_source: dict[str, Metrics] | None = Field(None, description="per data folder, when there were several")
    selective: Selective | None = None
    classes_absent: list[str] | None = Field(None, description="classes with no image in the set")
    macro_f1_present: float | None = Field(None, description="macro-F1 over the classes present")
    before_adaptation: Metrics | None = Field(None, description="the --init-from bundle on the same split")

    def recall(self, cls: str) -> float | None:
        e = self.per_class.get(cls)
        return e.recall if e is not None else None


class MaskSummary(_Strict):
    """Lung masks against the reference masks, mean over images (evaluate/lungs.py)."""

    dice: float
    iou: float
    dice_median: float
    dice_min: float
    n: int = Field(ge=0)


class WorstMask(_Strict):
    id: str
    source: str
    dice: float


class MaskMetrics(MaskSummary):
    per_source: dict[str, MaskSummary]
    worst: list[WorstMask] = Field([], description="the images with the lowest Dice, worst first")


class SkippedFile(_Strict):
    path: str
    reason: str


class ModelRef(_Strict):
    name: str
    version: int


class FolderEvaluation(Metrics):
    """`covid-cxr evaluate` on a labelled folder: the metrics, what was skipped, which model, which data."""

    skipped: list[SkippedFile] = []
    model: ModelRef
    data: str


OperatingPointResult.model_rebuild()
