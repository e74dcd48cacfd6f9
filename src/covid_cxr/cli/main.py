"""The `covid-cxr` command: one sub-command per stage, plus `run` (all stages) and `demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from covid_cxr.cli.common import (Commands, JsonOpt, config_option, fail, need_folders, open_bundle, quiet_libraries,
                                  write_json)
from covid_cxr.cli.common import err_console as console
from covid_cxr.core.errors import UserError
from covid_cxr.core.precision import DEFAULT_PRECISION, DEFAULT_RUNTIME
from covid_cxr.core.config import DEFAULTS, STUDY_MAX_PER_CLASS, TrainConfig

app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Chest X-ray classification (COVID-19 / Normal / Viral Pneumonia) by transfer learning.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect dataset folders.")
app.add_typer(data_app, name="data")
out_console = Console()


def _classes(classes: Optional[str]) -> Optional[list[str]]:
    return [c.strip() for c in classes.split(",") if c.strip()] if classes else None


# Options shared by train / lr-find / run (typer needs them spelled out per command); every default
# and help text comes from TrainConfig, so none is typed twice (tests/unit/train/test_config.py checks).
D = DEFAULTS


def _opt(field: str, *names: str, **kw):
    return config_option(TrainConfig, field, *names, **kw)


DataOpt = Annotated[Path, typer.Option("--data", help="Dataset folder (any supported layout).")]
DatasOpt = Annotated[list[Path], typer.Option("--data", help="Dataset folder (any supported layout); repeat to "
                                              "train on several (splits stratified by class and source).")]
ArchOpt = Annotated[Optional[str], _opt("arch")]
WeightsOpt = Annotated[Optional[str], _opt("weights")]
BalanceOpt = Annotated[Optional[str], _opt("balance")]
MaxOpt = Annotated[Optional[int], _opt("max_per_class")]
ClassesOpt = Annotated[Optional[str], typer.Option("--classes", help="Comma-separated classes to use.")]
SizeOpt = Annotated[Optional[int], _opt("image_size")]
HiddenOpt = Annotated[Optional[str], typer.Option(help="Head hidden sizes, comma-separated ('' for none).",
                                                  show_default=",".join(map(str, D.hidden)))]
DropoutOpt = Annotated[Optional[float], _opt("dropout")]
PrecisionOpt = Annotated[Optional[str], _opt("precision")]
TargetRecallOpt = Annotated[Optional[str], _opt("target_recall")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")]
AcceleratorOpt = Annotated[Optional[str], _opt("accelerator")]
DevicesOpt = Annotated[Optional[int], _opt("devices")]
NodesOpt = Annotated[Optional[int], _opt("num_nodes")]
StrategyOpt = Annotated[Optional[str], _opt("strategy")]
LoggerOpt = Annotated[Optional[str], _opt("logger")]
TrackingOpt = Annotated[Optional[str], _opt("tracking_uri", envvar="MLFLOW_TRACKING_URI")]


def _config(**kw) -> TrainConfig:
    """CLI values -> TrainConfig; a value out of range is a one-line error, not a traceback. Options
    left out arrive as None and are dropped, so `model_fields_set` is exactly what the user set
    (a recipe yields to those, and to nothing else)."""
    from pydantic import ValidationError

    kw = {k: v for k, v in kw.items() if v is not None and k in TrainConfig.model_fields}
    if "hidden" in kw:
        kw["hidden"] = [int(h) for h in str(kw["hidden"]).split(",") if h.strip()]
    if "classes" in kw:
        kw["classes"] = _classes(kw["classes"])
    try:
        return TrainConfig(**kw)
    except ValidationError as exc:
        e = exc.errors()[0]
        cause = e.get("ctx", {}).get("error")
        where = f"--{'-'.join(map(str, e['loc']))}: " if e["loc"] else ""
        fail(str(cause) if isinstance(cause, UserError) else f"{where}{e['msg']}")


@data_app.command("inspect")
def data_inspect(data_dir: Annotated[Path, typer.Argument(help="Dataset folder (any supported layout).")],
                 classes: ClassesOpt = None,
                 manifest: Annotated[Optional[Path], typer.Option(help="Write the manifest CSV here.")] = None,
                 near_threshold: Annotated[int, typer.Option(help="Max perceptual-hash bit distance.")] = 4,
                 json_path: JsonOpt = None):
    """Counts per class, skipped files with reasons, duplicate groups."""
    from collections import Counter, defaultdict

    from covid_cxr.data import build_manifest
    man = build_manifest(data_dir, _classes(classes), near_threshold=near_threshold)
    dup = man.dedupe
    if manifest:
        man.write_csv(manifest)
    counts = Counter((r.label, r.status) for r in man.records)
    groups = defaultdict(list)
    for r in man.ok:
        groups[r.group].append(r)
    near = [g for g in groups.values() if len(g) > 1]
    info = {"root": str(man.root), "layout": man.layout, "classes": list(man.classes),
            "counts": {c: {s: counts[(c, s)] for s in ("ok", "skipped", "duplicate")} for c in man.classes},
            "excluded_classes": man.excluded_classes, "duplicates": dup,
            "skipped": [{"path": r.path, "reason": r.reason} for r in man.records if r.status == "skipped"],
            "exact_duplicates": [{"path": r.path, "reason": r.reason} for r in man.records if r.status == "duplicate"],
            "near_duplicate_groups": [[r.path for r in g] for g in near]}
    write_json(json_path, info)
    t = Table(title=f"{man.root} — {man.layout}")
    for col in ("class", "usable", "skipped", "exact duplicates"):
        t.add_column(col)
    for c in man.classes:
        t.add_row(c, *(str(counts[(c, s)]) for s in ("ok", "skipped", "duplicate")))
    out_console.print(t)
    if man.excluded_classes:
        out_console.print(f"left out (not requested with --classes): {man.excluded_classes}")
    for s in info["skipped"]:
        out_console.print(f"[yellow]skipped[/] {s['path']}: {s['reason']}")
    for s in info["exact_duplicates"]:
        out_console.print(f"[yellow]duplicate[/] {s['path']}: {s['reason']}")
    out_console.print(f"near-duplicate groups (phash distance <= {near_threshold}): {len(near)} groups, "
                      f"{sum(map(len, near))} images; {dup['near_groups_across_classes']} span classes")
    for g in near[:10]:
        out_console.print("  " + ", ".join(f"{r.path}" for r in g))


@data_app.command("download")
def data_download(dest: Annotated[Path, typer.Argument(help="Folder to put the dataset in.")],
                  force: Annotated[bool, typer.Option("--force", help="Download again even if already there.")] = False):
    """Fetch the COVID-19 Radiography Database from Kaggle (kagglehub; its usual credentials)."""
    from covid_cxr.data.download import download

    root = download(dest, force)
    out_console.print(f"dataset: {root}\nnext: covid-cxr run --data '{root}' --out runs/real")


@app.command()
def train(data: DatasOpt, out: Annotated[Path, typer.Option("--out", help="Model repository (MODELS).")],
          arch: ArchOpt = None, weights: WeightsOpt = None, epochs: Annotated[Optional[int], _opt("epochs")] = None,
          batch_size: Annotated[Optional[int], _opt("batch_size")] = None, lr: Annotated[Optional[float], _opt("lr")] = None,
          seed: Annotated[Optional[int], _opt("seed")] = None, balance: BalanceOpt = None, max_per_class: MaxOpt = None,
          image_size: SizeOpt = None, hidden: HiddenOpt = None, dropout: DropoutOpt = None,
          patience: Annotated[Optional[int], _opt("patience")] = None,
          finetune: Annotated[Optional[bool], _opt("finetune")] = None, precision: PrecisionOpt = None,
          classes: ClassesOpt = None, name: Annotated[Optional[str], _opt("name")] = None,
          lung_crop: Annotated[Optional[str], _opt("lung_crop")] = None,
          lungs: Annotated[Optional[str], _opt("lungs")] = None,
          target_recall: TargetRecallOpt = None,
          target_confidence: Annotated[Optional[float], _opt("target_confidence")] = None,
          target_batch: Annotated[Optional[int], _opt("target_batch")] = None,
          finetune_epochs: Annotated[Optional[int], _opt("finetune_epochs")] = None,
          finetune_views: Annotated[Optional[int], _opt("finetune_views")] = None,
          finetune_from_block: Annotated[Optional[int], _opt("finetune_from_block")] = None,
          init_from: Annotated[Optional[str], _opt("init_from")] = None,
          site_unlabelled: Annotated[Optional[str], _opt("site_unlabelled")] = None,
          distil_from: Annotated[Optional[str], _opt("distil_from")] = None,
          distil_temperature: Annotated[Optional[float], _opt("distil_temperature")] = None,
          distil_weight: Annotated[Optional[float], _opt("distil_weight")] = None,
          extractor: Annotated[Optional[str], _opt("extractor")] = None,
          recipe: Annotated[Optional[str], typer.Option(help="A named recipe (train/recipes.py): study | "
                                                        "accurate; options you set win over it.")] = None,
          resume: ResumeOpt = False, accelerator: AcceleratorOpt = None, devices: DevicesOpt = None,
          num_nodes: NodesOpt = None, strategy: StrategyOpt = None, logger: LoggerOpt = None,
          tracking_uri: TrackingOpt = None):
    """Train one architecture (frozen backbone + head, or fine-tuned) and write its bundle MODELS/<name>/<version>.
    --devices N [--num-nodes M]: N processes per machine under DDP (see covid_cxr.train.distributed)."""
    cfg = _config(**locals())  # first: locals() holds exactly the options; _config keeps TrainConfig's
    need_folders(data + ([Path(site_unlabelled)] if site_unlabelled else []))  # before torch loads: 1 s, not 20
    from covid_cxr.train.fit import train as fit
    from covid_cxr.train.recipes import train_recipe

    quiet_libraries()
    source = data if len(data) > 1 else data[0]
    if recipe:
        path, metrics = train_recipe(recipe, source, out, cfg, resume)
    else:
        r = fit(source, out, cfg, resume=resume)
        path, metrics = r.bundle_path, r.metrics
    if path is None:  # another process of a multi-process run: the main one reports
        return
    _print_metrics(metrics, f"{path.parent.name}: test split")
    out_console.print(f"bundle: {path}\nreport: {path / 'report' / 'metrics.md'}")


@app.command("lr-find")
def lr_find_cmd(data: DataOpt, out: Annotated[Path, typer.Option("--out", help="Plot PNG path.")] = Path("lr_find.png"),
                arch: ArchOpt = None, weights: WeightsOpt = None,
                batch_size: Annotated[Optional[int], _opt("batch_size")] = None, seed: Annotated[Optional[int], _opt("seed")] = None,
                balance: BalanceOpt = None, max_per_class: MaxOpt = None,
                image_size: SizeOpt = None, min_lr: Annotated[float, typer.Option(help="Lowest rate of the sweep.")] = 1e-6,
                max_lr: Annotated[float, typer.Option(help="Highest rate of the sweep.")] = 1.0,
                steps: Annotated[int, typer.Option(help="Steps of the sweep (one batch each).")] = 100,
                classes: ClassesOpt = None,
                workdir: Annotated[Path, typer.Option(help="Feature cache folder.")] = Path("runs/.work")):
    """LR range test: saves the loss-vs-LR plot (log scale) and prints the suggested rate."""
    from covid_cxr.data import prepare
    from covid_cxr.train.lr_find import lr_find

    quiet_libraries()
    cfg = _config(arch=arch, weights=weights, batch_size=batch_size, seed=seed, balance=balance,
                  max_per_class=max_per_class, image_size=image_size, classes=classes)
    need_folders(data)
    prepared = prepare(data, cfg.classes, cfg.balance, cfg.max_per_class, cfg.seed)
    r = lr_find(prepared, cfg, out, workdir, min_lr, max_lr, steps)
    out_console.print(f"suggested learning rate: {r.suggestion:.3g}" if r.suggestion else "no suggestion (flat curve)")
    out_console.print(f"plot: {r.plot}")


def _print_metrics(m, title: str) -> None:
    """The study's table of a Metrics (core.results), and the operating point's beside it."""
    t = Table(title=title)
    for col in ("Category", "Precision", "Recall", "F1", "Support", "ROC AUC"):
        t.add_column(col)
    for c, e in m.per_class.items():
        t.add_row(c, f"{e.precision:.3f}", f"{e.recall:.3f}", f"{e.f1:.3f}", str(e.support),
                  "–" if e.roc_auc is None else f"{e.roc_auc:.3f}")
    out_console.print(t)
    lo, hi = m.accuracy_ci95
    out_console.print(f"accuracy {m.accuracy:.3f} (95% CI {lo:.3f}–{hi:.3f}, n={m.n})")
    op = m.operating_point
    if op:  # the table the bundle decides by, beside the argmax one above
        _print_metrics(op.metrics, f"{title}, operating point: {op.class_name} when p >= {op.threshold:.4f}")


@app.command()
def evaluate(model: Annotated[Path, typer.Option("--model", help="MODELS/<name>\\[/<version>]")], data: DataOpt,
             out: Annotated[Optional[Path], typer.Option(help="Report folder.")] = None,
             json_path: JsonOpt = None):
    """Evaluate a bundle on any labelled folder: per-class metrics, AUC, confusion matrix, curves."""
    from covid_cxr.evaluate.external import evaluate_folder

    quiet_libraries()
    b = open_bundle(model)
    need_folders(data)
    _warn_if_training_data(b, data)
    out = out or Path("runs/evaluate") / f"{b.name}-v{b.version}-{data.resolve().name}"
    m = evaluate_folder(b, data, out)
    _print_metrics(m, f"{b.name} v{b.version} on {data}")
    for s in m.skipped:
        out_console.print(f"[yellow]skipped[/] {s.path}: {s.reason}")
    if m.ood_rate is not None:
        out_console.print(f"out of distribution: {m.ood_rate:.1%} of the images")
    sel = m.selective
    if sel:
        at = ", ".join(f"{float(c):.0%} coverage {e.accuracy:.3f}" for c, e in sel.at_coverage.items())
        out_console.print(f"selective prediction: AURC {sel.aurc:.4f}; accuracy at {at}")
    if m.classes_absent:
        out_console.print(f"absent classes: {', '.join(m.classes_absent)} (macro-F1 over those present "
                          f"{m.macro_f1_present:.3f})")
    write_json(json_path, _evaluate_json(m))
    out_console.print(f"report: {out / 'metrics.md'}")


def _warn_if_training_data(b, data: Path) -> None:
    """Figures on the folder the model was trained from include its training images: say so."""
    t = b.metadata.training
    if t is None:
        return
    root, d = Path(t.data.dataset_root).resolve(), data.resolve()
    if d == root or d in root.parents or root in d.parents:
        console.print(f"[yellow]warning:[/] {data} overlaps the folder this model was trained from "
                      f"({t.data.dataset_root}): these figures include its training images. The held-out "
                      f"figures are in the bundle's report (test split).", highlight=False)


def _evaluate_json(m) -> dict:
    """`evaluate --json`: each figure with its bootstrap 95% interval beside it ("ci")."""
    out = m.model_dump(mode="json", include={"accuracy", "macro_f1", "ece", "brier", "ood_rate", "n", "ci",
                                             "selective", "classes_absent", "macro_f1_present"})
    keys = {"precision", "recall", "f1", "support", "ci"}
    return {**out, "classes_absent": m.classes_absent or [],
            "per_class": {c: e.model_dump(mode="json", include=keys) for c, e in m.per_class.items()}}


@app.command()
def compare(models: Annotated[Path, typer.Argument(help="Model repository")],
            out: Annotated[Path, typer.Option(help="Folder for comparison.md/.csv (never the model repository: "
                                              "a server reads that).")] = Path("runs/compare")):
    """The study's table (Category, Model, Precision, Recall, F1, Accuracy) for every model."""
    from covid_cxr.evaluate.compare import COLUMNS, write_comparison

    rows, md, csv_path = write_comparison(models, out)
    t = Table(title="comparison (test split)")
    for c in COLUMNS:
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(r[c]) for c in COLUMNS))
    out_console.print(t)
    out_console.print(f"saved: {md}, {csv_path}")


@app.command()
def predict(images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, DICOM)")],
            model: Annotated[Path, typer.Option("--model", help="MODELS/<name>\\[/<version>]")],
            json_path: JsonOpt = None,
            lungs: Annotated[Optional[Path], typer.Option("--lungs", help="Lung segmentation bundle: add its "
                                                          "sanity check (a failed one: out of distribution?)")] = None,
            runtime: Annotated[str, typer.Option(help="what runs model.onnx: onnxruntime | openvino")] = DEFAULT_RUNTIME,
            precision: Annotated[str, typer.Option(help="fp32 | bf16 | bf16-split | int8 (OpenVINO; only a variant "
                                                   "`bundle precision` accepted)")] = DEFAULT_PRECISION):
    """Label and class probabilities per image (through the bundle's ONNX model). An image the gate
    rejects gets no label: its probabilities stay in the table and the JSON."""
    from covid_cxr.bundle import load_bundle

    b = open_bundle(model)
    if (runtime, precision) != (DEFAULT_RUNTIME, DEFAULT_PRECISION):
        b = load_bundle(b.path, runtime=runtime, precision=precision)  # RuntimeRefused: one line, exit 2
    seg = _lung_segmenter(lungs)
    results = [_predict_one(b, p, seg) for p in images]
    write_json(json_path, {"model": b.name, "version": b.version, "results": results})
    out_console.print(_predict_table(b, results, seg is not None))
    if any(r.get("error") for r in results):
        raise typer.Exit(1)


def _predict_one(b, path: Path, seg) -> dict:
    """One image -> its row: label (None when the gate rejects it), probabilities, gate, lung check."""
    from covid_cxr.data.decode import DecodeError, load_for_model

    try:
        pixels = load_for_model(path, *b.input_hw)
        answers = b.answer(pixels[None])  # Bundle.prepare, the ONNX runner, the operating point, the gate
    except DecodeError as exc:
        return {"image": str(path), "error": str(exc)}
    row = {"image": str(path), **answers.row(0, b.classes)}
    if row["in_distribution"] is False:
        row["rejected"] = "unlike the training X-rays: no label is given"
    if seg is not None:
        from covid_cxr.lungs.segment import sanity_check

        row["lung_check"] = sanity_check(seg.masks(pixels[None])[0]).as_dict()
    return row


def _predict_table(b, results: list[dict], lungs: bool) -> Table:
    """Readable at 80 columns: file names (not paths) fold, probabilities in short columns, and the
    gate's verdict in a word; rejected images show no label."""
    t = Table(title=f"{b.name} v{b.version}", caption="gate: 'no' = unlike the training X-rays, no label given")
    t.add_column("image", overflow="fold", ratio=3)
    t.add_column("label", overflow="fold", ratio=2)
    for c in b.classes:
        t.add_column(_short(c), justify="right", no_wrap=True)
    if lungs:
        t.add_column("lungs", overflow="fold")
    t.add_column("gate", no_wrap=True)
    for r in results:
        if r.get("error"):
            t.add_row(Path(r["image"]).name, f"[red]{r['error']}[/]", *[""] * (len(b.classes) + 1 + lungs))
            continue
        label = r["label"] or "[red]—[/]"
        t.add_row(Path(r["image"]).name, label, *(f"{r['probabilities'][c]:.3f}" for c in b.classes),
                  *([_lung_text(r["lung_check"])] if lungs else []), _gate(r))
    return t


def _short(name: str) -> str:
    """'Viral Pneumonia' -> 'Viral Pn.': class columns stay narrow."""
    return name if len(name) <= 9 else name[:8].rstrip() + "."


def _gate(r: dict) -> str:
    if r["in_distribution"] is None:
        return "–"
    return "yes" if r["in_distribution"] else "[red]no[/]"


def _lung_segmenter(lungs: Optional[Path]):
    if lungs is None:
        return None
    from covid_cxr.lungs.segment import LungSegmenter

    return LungSegmenter.from_bundle(lungs)


def _lung_text(check: dict) -> str:
    from rich.markup import escape

    return "ok" if check["ok"] else "[yellow]failed: " + escape("; ".join(check["problems"])) + " (out of distribution?)[/]"


@app.command()
def run(data: DataOpt, out: Annotated[Path, typer.Option("--out", help="Run folder: models, reports, summary.")] = Path("runs/run"),
        archs: Annotated[str, typer.Option(help="Comma-separated architectures.")] = D.arch,
        weights: WeightsOpt = None, epochs: Annotated[Optional[int], _opt("epochs")] = None,
        batch_size: Annotated[Optional[int], _opt("batch_size")] = None, lr: Annotated[Optional[float], _opt("lr")] = None,
        seed: Annotated[Optional[int], _opt("seed")] = None, balance: BalanceOpt = None, max_per_class: MaxOpt = None,
        image_size: SizeOpt = None, hidden: HiddenOpt = None, dropout: DropoutOpt = None,
        patience: Annotated[Optional[int], _opt("patience")] = None, precision: PrecisionOpt = None,
        classes: ClassesOpt = None, target_recall: TargetRecallOpt = None, resume: ResumeOpt = False,
        logger: LoggerOpt = None, tracking_uri: TrackingOpt = None):
    """All stages: data -> train each architecture -> evaluate -> compare -> summary report."""
    _run(data, out, archs, False, resume, weights=weights, epochs=epochs, batch_size=batch_size, lr=lr,
         seed=seed, balance=balance, max_per_class=max_per_class, image_size=image_size, hidden=hidden,
         dropout=dropout, patience=patience, precision=precision, classes=classes, target_recall=target_recall,
         logger=logger, tracking_uri=tracking_uri)


def _run(data: Path, out: Path, archs: str, synthetic: bool, resume: bool, **cfg) -> None:
    from covid_cxr.pipeline import run_pipeline

    quiet_libraries()
    arch_list = [a.strip() for a in archs.split(",") if a.strip()]
    base = _config(**cfg)
    if not synthetic:
        need_folders(data)
    for a in arch_list:
        _config(**cfg, arch=a)  # every architecture known before anything runs
    s = run_pipeline(data, out, arch_list, base, synthetic=synthetic, resume=resume,
                     log=lambda m: console.print(f"[cyan]›[/] {m}"))
    from covid_cxr.evaluate.compare import to_markdown

    out_console.print(to_markdown(s["comparison"]))
    out_console.print(f"report: {s['report']}\nmodels: {s['models']}")


@app.command()
def demo(data: Annotated[Optional[Path], typer.Option("--data", help="Real dataset folder; default: "
                                                       "generate a small SYNTHETIC one.")] = None,
         out: Annotated[Path, typer.Option("--out", help="Run folder: models, reports, summary.")] = Path("runs/demo"),
         archs: Annotated[str, typer.Option(help="Comma-separated architectures.")] = D.arch):
    """The whole pipeline with no download: your data (--data) or a labelled SYNTHETIC set."""
    synthetic = data is None
    if synthetic:
        from covid_cxr.data.synthetic import make_synthetic_dataset

        data = make_synthetic_dataset(out / "synthetic-data")
        console.print(f"[yellow]No --data given: using a generated SYNTHETIC dataset at {data}[/]")
    _run(data, out, archs, synthetic, False, max_per_class=None if synthetic else STUDY_MAX_PER_CLASS)


def _register_plugins() -> None:
    from covid_cxr.cli.bundle import register as register_bundle
    from covid_cxr.cli.bundle import register_ensemble
    from covid_cxr.cli.card import register as register_card
    from covid_cxr.cli.score import register as register_score
    from covid_cxr.cli.explain import register as register_explain
    from covid_cxr.cli.export import register as register_export
    from covid_cxr.cli.lungs import register as register_lungs
    from covid_cxr.cli.serve import register as register_serve
    from covid_cxr.cli.audit import register as register_trust
    from covid_cxr.cli.site import register as register_site

    register_bundle(app)
    register_ensemble(app)
    register_card(app)
    register_score(app)
    register_explain(app)
    register_export(app)
    register_lungs(app)
    register_serve(app)
    register_site(app)
    register_trust(app)


_register_plugins()
