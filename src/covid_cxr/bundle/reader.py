"""Read a bundle with numpy and ONNX Runtime only (no torch): what the server and evaluation use.

Every problem with a bundle is a `BundleError` whose message is one line naming the file and what
is wrong; the CLI prints it and exits 2, the server reports it as the version's load error.
"""

from __future__ import annotations

import functools
import json
from importlib.metadata import entry_points
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from covid_cxr.bundle.schema import (
    CAM_OUTPUT,
    FORMAT_VERSION,
    ONNX_INPUT,
    ONNX_OUTPUT,
    OOD_OUTPUTS,
    BundleMetadata,
    upgrade,
)
from covid_cxr.bundle.runtime import check_choice, check_variant
from covid_cxr.bundle.store import FILES, versions
from covid_cxr.core.errors import UserError
from covid_cxr.core.files import file_sha256
from covid_cxr.core.precision import DEFAULT_PRECISION, DEFAULT_RUNTIME


class BundleError(UserError):
    """A bundle that cannot be used; str() is one line: '<file>: <what is wrong>'."""


class NoCamGraph(BundleError):
    """The bundle has no cam.onnx (written before Grad-CAM moved into the graph, or an architecture
    whose Grad-CAM layer is not the pooled map): the server answers without a map and says why."""


@dataclass(frozen=True)
class Answers:
    """What a bundle answers for N images, whichever door they came in by (server, predict,
    evaluate, explain, audit): one place turns the runner's arrays into labels and the gate's verdict."""

    probabilities: np.ndarray  # N x classes, calibrated (model.onnx applies the temperature)
    labels: np.ndarray  # N class indices: the operating point if the bundle has one, else the argmax
    ood_score: np.ndarray | None = None  # N, None for a bundle without an out-of-distribution gate
    in_distribution: np.ndarray | None = None  # N bool, None without a gate

    def row(self, i: int, classes: list[str]) -> dict:
        """Image i as predict --json and the upload API report it."""
        inside = None if self.in_distribution is None else bool(self.in_distribution[i])
        return {"label": None if inside is False else classes[int(self.labels[i])],  # rejected: no label
                "probabilities": {c: float(p) for c, p in zip(classes, self.probabilities[i])},
                "in_distribution": inside,
                "ood_score": None if self.ood_score is None else float(self.ood_score[i])}


@dataclass(eq=False)
class Bundle:
    path: Path
    metadata: BundleMetadata
    format_on_disk: int = FORMAT_VERSION  # 1: written by the first release, upgraded when read
    _session: object = field(default=None, repr=False)
    step_state: dict = field(default_factory=dict, repr=False)  # what a preparation step keeps open
    _cam: object = field(default=None, repr=False)
    runtime: str = "onnxruntime"  # what session() runs model.onnx on (core.precision.RUNTIMES)
    precision: str = "fp32"  # a lower one only as an accepted variant (metadata.json precision_variants)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def version(self) -> int:
        return self.metadata.version

    @property
    def classes(self) -> list[str]:
        return list(self.metadata.classes)

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.metadata.input_hw

    @property
    def onnx_path(self) -> Path:
        return self.path / self.metadata.onnx.file

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    def session(self):
        """The session for model.onnx on the bundle's runtime and precision (created once per Bundle,
        checked against the metadata): ONNX Runtime, or OpenVINO's answering like one."""
        if self._session is None:
            self._session = open_checked_session(self)
        return self._session

    @property
    def has_cam(self) -> bool:
        return self.metadata.cam is not None

    def cam_session(self, threads: int = 0, spinning: bool = True):
        """ONNX Runtime session for cam.onnx (opened once, checked against the metadata);
        NoCamGraph for a bundle without one."""
        if self._cam is None:
            self._cam = open_cam_session(self, threads, spinning)
        return self._cam

    def cam_maps(self, seen: np.ndarray, threads: int = 0, spinning: bool = True) -> np.ndarray:
        """Grad-CAM maps N x classes x H x W in [0, 1] through cam.onnx (no torch) of N x H x W
        images as model.onnx takes them (already through `prepare`)."""
        x = np.ascontiguousarray(seen, dtype=np.float32)[..., None]
        maps = self.cam_session(threads, spinning).run([CAM_OUTPUT], {ONNX_INPUT: x})[0]
        return np.clip(np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """N x H x W float [0, 1] (already resized to input_hw) -> N x classes probabilities."""
        return self.predict_with_ood(images)[0]

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """N x H x W float [0, 1] at input_hw -> what model.onnx was trained on: the lung-only crop
        for a bundle trained with --lung-crop (metadata `lung_crop`), else the images as they are.
        Every reader goes through here (run_classifier, Grad-CAM), so a bundle answers alike
        wherever it runs. The step itself comes from the registry (`prepare_step`)."""
        if self.metadata.lung_crop is None:
            return images
        return prepare_step("lung_crop")(self, np.asarray(images, dtype=np.float32))

    @property
    def temperature(self) -> float:
        """What model.onnx divides the logits by (1.0 for bundles without calibration)."""
        cal = self.metadata.trust.calibration if self.metadata.trust is not None else None
        return cal.temperature if cal is not None else 1.0

    @property
    def has_ood(self) -> bool:
        """Whether model.onnx also answers ood_score and in_distribution (bundles since trust/)."""
        return self.metadata.has_ood

    def predict_with_ood(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(probabilities N x C, ood_score N or None, in_distribution N bool or None): None for
        bundles without an out-of-distribution gate."""
        return run_classifier(self, self.session(), np.asarray(images, dtype=np.float32)[..., None])

    def answer(self, images: np.ndarray, prepared: bool = False) -> Answers:
        """N x H x W float [0, 1] at input_hw -> probabilities, decided labels and the gate's verdict
        (`prepared`: the images already went through `prepare`, as Grad-CAM needs them too)."""
        x = np.asarray(images, dtype=np.float32)[..., None]
        return self.answers(*run_classifier(self, self.session(), x, prepared))

    def answers(self, probs: np.ndarray, score: np.ndarray | None = None,
                inside: np.ndarray | None = None) -> Answers:
        """The runner's arrays -> Answers (the server calls this on what its batcher returned)."""
        return Answers(probs, self.decide(probs), score, None if inside is None else np.asarray(inside, bool))

    def trust_arrays(self) -> dict[str, np.ndarray] | None:
        """trust.safetensors' tensors: temperature and the gate's (read them with trust.ood.OODStats.from_arrays);
        None for older bundles."""
        from safetensors.numpy import load_file

        from covid_cxr.bundle.schema import TRUST_FILE

        path = self.path / TRUST_FILE
        return load_file(str(path)) if path.is_file() else None

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Class indices for N x classes probabilities: the operating point if set, else the argmax."""
        from covid_cxr.bundle.schema import decide

        op = self.metadata.operating_point
        if op is None:
            return decide(probs, None, None)
        return decide(probs, self.classes.index(op.class_name), op.threshold)


def run_classifier(bundle: Bundle, session, x: np.ndarray, prepared: bool = False
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The bundle's preparation (`Bundle.prepare`: the lung crop, if any; skipped when `prepared`)
    and one ONNX Runtime call on N x H x W x 1: (probabilities, ood_score, in_distribution as bool),
    the last two None for a bundle without an out-of-distribution gate. The bundle and the server
    both run a classifier through here (the server with its own `session`)."""
    if not prepared:
        x = bundle.prepare(x[..., 0])[..., None]  # views, no copy, for a bundle without lung_crop
    if not bundle.has_ood:
        return session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0], None, None
    probs, score, inside = session.run([ONNX_OUTPUT, *OOD_OUTPUTS], {ONNX_INPUT: x})
    return probs, score, inside > 0.5


# The registry of preparation steps a bundle's metadata can name: entry points of this group (see
# pyproject.toml), so the reader applies the lung crop without importing the lungs package.
PREPARE_STEPS = "covid_cxr.prepare_steps"


@functools.cache
def prepare_step(name: str):
    """The step registered as `name`: a function (bundle, N x H x W float32) -> N x H x W float32.
    Looked up once per process (scanning the entry points costs milliseconds; prepare runs per batch)."""
    found = list(entry_points(group=PREPARE_STEPS, name=name))
    if not found:
        raise BundleError(f"the bundle needs the preparation step {name!r}, which is not installed "
                          f"(reinstall covid-cxr: `pip install -e .`)")
    return found[0].load()


def read_metadata(path: Path) -> BundleMetadata:
    """Parse and validate `path/metadata.json` (format 1 is upgraded); BundleError otherwise."""
    return _read_metadata(path)[0]


# metadata.json of a real bundle is a few kB (an ensemble's, tens); anything far larger is not one,
# and is refused before it is read into memory.
MAX_METADATA_BYTES = 4 * 1024 * 1024


def read_json_file(file: Path, max_bytes: int = MAX_METADATA_BYTES):
    """A bundle's JSON file, parsed; BundleError (one line) for anything a parser can throw on a
    hostile file: too large, not UTF-8, not JSON, nested deeper than Python's recursion limit."""
    try:
        with open(file, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise BundleError(f"{file}: missing") from None
    except OSError as exc:
        raise BundleError(f"{file}: unreadable: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise BundleError(f"{file}: larger than {max_bytes} bytes; not a bundle's metadata")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{file}: unreadable: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{file}: not valid JSON (truncated?): {exc}") from None
    except (RecursionError, ValueError) as exc:  # 100,000 nested brackets, huge numbers
        raise BundleError(f"{file}: not usable JSON ({type(exc).__name__}: nested too deep?)") from None


def _read_metadata(path: Path) -> tuple[BundleMetadata, int]:
    file = path / "metadata.json"
    raw = read_json_file(file)
    if not isinstance(raw, dict):
        raise BundleError(f"{file}: expected a JSON object, found {type(raw).__name__}")
    fv = raw.get("format_version")
    if fv not in (1, FORMAT_VERSION):
        raise BundleError(f"{file}: format_version {fv!r} is not one this covid-cxr reads (1 or {FORMAT_VERSION})")
    try:
        return BundleMetadata.model_validate(upgrade(raw)), fv
    except ValidationError as exc:
        raise BundleError(f"{file}: {_first_error(exc)}") from None
    except RecursionError:
        raise BundleError(f"{file}: nested too deep to validate") from None
    except (KeyError, TypeError, ValueError) as exc:  # a format-1 file missing what upgrade() needs
        raise BundleError(f"{file}: format-1 metadata without {exc}") from None


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    e = errors[0]
    where = ".".join(str(p) for p in e["loc"]) or "(top level)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {e['msg']}{more}"


def resolve(path: str | Path, version: int | None = None) -> Path:
    """MODELS/<name>/<version> as given, or MODELS/<name> -> its newest version (or `version`)."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    vs = versions(path)
    if not vs:
        raise BundleError(f"{path}: no model bundle here (expected metadata.json or numbered version folders)")
    if version is not None and version not in vs:
        raise BundleError(f"{path}: no version {version}; versions: {vs}")
    return path / str(version or vs[-1])


def load_bundle(path: str | Path, version: int | None = None, runtime: str = DEFAULT_RUNTIME,
                precision: str = DEFAULT_PRECISION) -> Bundle:
    """Open a bundle: metadata validated against the schema, its files present. BundleError otherwise;
    RuntimeRefused for a runtime/precision it may not run with (a lower precision needs an accepted
    measurement in metadata.json)."""
    check_choice(runtime, precision)
    path = resolve(path, version)
    meta, stored = _read_metadata(path)
    for name in FILES[1:]:
        if not (path / name).is_file():
            raise BundleError(f"{path / name}: missing")
    if meta.cam is not None and not (path / meta.cam.file).is_file():
        raise BundleError(f"{path / meta.cam.file}: missing (metadata.json's cam names it)")
    if meta.lung_crop is not None:
        for name in FILES[:2]:
            if not (path / meta.lung_crop.folder / name).is_file():
                raise BundleError(f"{path / meta.lung_crop.folder / name}: missing (the lung model that "
                                  "metadata.json's lung_crop needs)")
    check_variant(meta, precision)
    return Bundle(path, meta, stored, runtime=runtime, precision=precision)


def load_embedded_lungs(bundle: Bundle) -> Bundle:
    """The lung segmentation model inside a --lung-crop classifier bundle (metadata.json and
    model.onnx only: its training weights stay with the original), its model.onnx verified
    against the sha256 the classifier recorded."""
    path = bundle.path / bundle.metadata.lung_crop.folder
    meta, stored = _read_metadata(path)
    if meta.task != "segmentation":
        raise BundleError(f"{path / 'metadata.json'}: a {meta.task} model, not a lung segmentation model")
    onnx = path / meta.onnx.file
    if not onnx.is_file():
        raise BundleError(f"{onnx}: missing")
    digest, want = file_sha256(onnx), bundle.metadata.lung_crop.onnx_sha256
    if digest != want:  # every reader (serve, predict, evaluate, check) runs only the file it was written with
        raise BundleError(f"{onnx}: not the lung model this bundle was written with (sha256 "
                          f"{digest[:12]}..., metadata.json says {want[:12]}...)")
    return Bundle(path, meta, stored)


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


def open_checked_session(bundle: Bundle, threads: int = 0, spinning: bool = True):
    """A session for the bundle's model.onnx whose tensors match the metadata (BundleError if not),
    on the bundle's runtime (OpenVINO: at its precision, the variant's gate threshold applied)."""
    if bundle.runtime == "openvino":
        from covid_cxr.bundle.runtime import open_openvino

        variant = check_variant(bundle.metadata, bundle.precision)
        session = open_openvino(bundle.path, bundle.metadata, bundle.precision, threads, variant)
        check_session(bundle, session)
        return session
    try:
        session = open_session(bundle.onnx_path, threads, spinning)
    except Exception as exc:  # onnxruntime raises its own exception types for broken files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"{bundle.onnx_path}: ONNX Runtime cannot load it: {msg.replace(str(bundle.path), '')}") from None
    check_session(bundle, session)
    return session


def open_cam_session(bundle: Bundle, threads: int = 0, spinning: bool = True):
    """A session for the bundle's cam.onnx whose tensors match metadata.json's `cam`."""
    cam = bundle.metadata.cam
    if cam is None:
        raise NoCamGraph(f"{bundle.name} v{bundle.version}: this bundle has no Grad-CAM output (cam.onnx); "
                         f"add one with `covid-cxr bundle add-cam MODELS/{bundle.name}` (or write it again "
                         "with this covid-cxr)")
    path = bundle.path / cam.file
    try:
        session = open_session(path, threads, spinning)
    except Exception as exc:  # onnxruntime raises its own exception types for broken files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"{path}: ONNX Runtime cannot load it: {msg.replace(str(bundle.path), '')}") from None
    _check_tensors(path, session, cam.inputs, cam.outputs)
    return session


def _shape(dims) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in dims]


def check_session(bundle: Bundle, session) -> None:
    """The ONNX graph's inputs and outputs must be the metadata's (names, shapes, float32)."""
    spec = bundle.metadata.onnx
    _check_tensors(bundle.onnx_path, session, spec.inputs, spec.outputs)


def _check_tensors(path: Path, session, inputs, outputs) -> None:
    for kind, got, want in (("inputs", session.get_inputs(), inputs), ("outputs", session.get_outputs(), outputs)):
        have = {t.name: t for t in got}
        for t in want:
            if t.name not in have:
                raise BundleError(f"{path}: has {kind} {sorted(have)}; metadata.json names {t.name!r}")
            shape = _shape(have[t.name].shape)
            if shape != t.shape:
                raise BundleError(f"{path}: {kind[:-1]} {t.name!r} has shape {shape}; metadata.json says {t.shape}")
            if have[t.name].type != "tensor(float)":
                raise BundleError(f"{path}: {kind[:-1]} {t.name!r} is {have[t.name].type}, expected float32")
