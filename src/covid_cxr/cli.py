"""The `covid-cxr` command: one sub-command per stage, plus `run` (all stages) and `demo`."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from covid_cxr.cliutil import config_option, fail, open_bundle
from covid_cxr.cliutil import err_console as console
from covid_cxr.errors import UserError
from covid_cxr.train.config import DEFAULTS, STUDY_MAX_PER_CLASS, TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Chest X-ray classification (COVID-19 / Normal / Viral Pneumonia) by transfer learning.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect dataset folders.")
app.add_typer(data_app, name="data")
out_console = Console()


def _quiet() -> None:
    """Lightning and torch.onnx are chatty; keep the terminal for what the user asked."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


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
ArchOpt = Annotated[str, _opt("arch")]
WeightsOpt = Annotated[str, _opt("weights")]
BalanceOpt = Annotated[str, _opt("balance")]
MaxOpt = Annotated[Optional[int], _opt("max_per_class")]
ClassesOpt = Annotated[Optional[str], typer.Option("--classes", help="Comma-separated classes to use.")]
SizeOpt = Annotated[Optional[int], _opt("image_size")]
HiddenOpt = Annotated[str, typer.Option(help="Head hidden sizes, comma-separated ('' for none).")]
DropoutOpt = Annotated[Optional[float], _opt("dropout")]
PrecisionOpt = Annotated[str, _opt("precision")]
TargetRecallOpt = Annotated[Optional[str], _opt("target_recall")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")]
AcceleratorOpt = Annotated[str, _opt("accelerator")]
DevicesOpt = Annotated[int, _opt("devices")]
NodesOpt = Annotated[int, _opt("num_nodes")]
StrategyOpt = Annotated[str, _opt("strategy")]
LoggerOpt = Annotated[str, _opt("logger")]
TrackingOpt = Annotated[Optional[str], _opt("tracking_uri", envvar="MLFLOW_TRACKING_URI")]
HIDDEN_DEFAULT = ",".join(map(str, D.hidden))


def _config(**kw) -> TrainConfig:
    """CLI values -> TrainConfig; a value out of range is a one-line error, not a traceback."""
    from pydantic import ValidationError

    if "hidden" in kw:
        kw["hidden"] = [int(h) for h in str(kw["hidden"]).split(",") if h.strip()]
    kw["classes"] = _classes(kw.get("classes"))
    try:
        return TrainConfig(**kw)
    except ValidationError as exc:
        e = exc.errors()[0]
        cause = e.get("ctx", {}).get("error")
        where = f"--{'-'.join(map(str, e['loc']))}: " if e["loc"] else ""
        fail(str(cause) if isinstance(cause, UserError) else f"{where}{e['msg']}")


@data_app.command("inspect")
def data_inspect(data_dir: Path, classes: ClassesOpt = None,
                 manifest: Annotated[Optional[Path], typer.Option(help="Write the manifest CSV here.")] = None,
                 near_threshold: Annotated[int, typer.Option(help="Max perceptual-hash bit distance.")] = 4,
                 json_out: Annotated[bool, typer.Option("--json")] = False):
    """Counts per class, skipped files with reasons, duplicate groups."""
    from collections import Counter, defaultdict

    from covid_cxr.data import build_manifest
    try:
        man = build_manifest(data_dir, _classes(classes), near_threshold=near_threshold)
    except UserError as exc:
        fail(str(exc))
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
    if json_out:
        out_console.print_json(json.dumps(info))
        return
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
                  force: Annotated[bool, typer.Option(help="Download again even if already there.")] = False):
    """Fetch the COVID-19 Radiography Database from Kaggle (kagglehub; its usual credentials)."""
    from covid_cxr.data.download import download

    try:
        root = download(dest, force)
    except UserError as exc:
        fail(str(exc))
    out_console.print(f"dataset: {root}\nnext: covid-cxr run --data '{root}' --out runs/real")


@app.command()
def train(data: DatasOpt, out: Annotated[Path, typer.Option("--out", help="Model repository (MODELS).")],
          arch: ArchOpt = D.arch, weights: WeightsOpt = D.weights, epochs: Annotated[int, _opt("epochs")] = D.epochs,
          batch_size: Annotated[int, _opt("batch_size")] = D.batch_size, lr: Annotated[float, _opt("lr")] = D.lr,
          seed: int = D.seed, balance: BalanceOpt = D.balance, max_per_class: MaxOpt = D.max_per_class,
          image_size: SizeOpt = D.image_size, hidden: HiddenOpt = HIDDEN_DEFAULT, dropout: DropoutOpt = D.dropout,
          patience: Annotated[int, _opt("patience")] = D.patience,
          finetune: Annotated[bool, _opt("finetune")] = D.finetune, precision: PrecisionOpt = D.precision,
          classes: ClassesOpt = None, name: Annotated[Optional[str], _opt("name")] = D.name,
          lung_crop: Annotated[str, _opt("lung_crop")] = D.lung_crop,
          lungs: Annotated[Optional[str], _opt("lungs")] = D.lungs,
          target_recall: TargetRecallOpt = D.target_recall,
          finetune_epochs: Annotated[int, _opt("finetune_epochs")] = D.finetune_epochs,
          finetune_views: Annotated[int, _opt("finetune_views")] = D.finetune_views,
          init_from: Annotated[Optional[str], _opt("init_from")] = D.init_from,
          extractor: Annotated[str, _opt("extractor")] = D.extractor,
          recipe: Annotated[Optional[str], typer.Option(help="A named recipe (train/recipes.py): study | "
                                                        "accurate; options you set win over it.")] = None,
          resume: ResumeOpt = False, accelerator: AcceleratorOpt = D.accelerator, devices: DevicesOpt = D.devices,
          num_nodes: NodesOpt = D.num_nodes, strategy: StrategyOpt = D.strategy, logger: LoggerOpt = D.logger,
          tracking_uri: TrackingOpt = None):
    """Train one architecture (frozen backbone + head, or fine-tuned) and write its bundle MODELS/<name>/<version>.
    --devices N [--num-nodes M]: N processes per machine under DDP (see covid_cxr.train.distributed)."""
    from covid_cxr.train.fit import train as fit
    from covid_cxr.train.recipes import train_recipe

    _quiet()
    cfg = _config(arch=arch, weights=weights, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                  balance=balance, max_per_class=max_per_class, image_size=image_size, hidden=hidden,
                  dropout=dropout, patience=patience, finetune=finetune, precision=precision,
                  classes=classes, name=name, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                  strategy=strategy, logger=logger, tracking_uri=tracking_uri, lung_crop=lung_crop, lungs=lungs,
                  target_recall=target_recall, finetune_epochs=finetune_epochs, finetune_views=finetune_views,
                  init_from=init_from, extractor=extractor)
    source = data if len(data) > 1 else data[0]
    try:
        if recipe:
            path, metrics = train_recipe(recipe, source, out, cfg, resume)
        else:
            r = fit(source, out, cfg, resume=resume)
            path, metrics = r.bundle_path, r.metrics
    except UserError as exc:
        fail(str(exc))
    if path is None:  # another process of a multi-process run: the main one reports
        return
    _print_metrics(metrics, f"{path.parent.name}: test split")
    out_console.print(f"bundle: {path}\nreport: {path / 'report' / 'metrics.md'}")


@app.command("lr-find")
def lr_find_cmd(data: DataOpt, out: Annotated[Path, typer.Option("--out", help="Plot PNG path.")] = Path("lr_find.png"),
                arch: ArchOpt = D.arch, weights: WeightsOpt = D.weights,
                batch_size: Annotated[int, _opt("batch_size")] = D.batch_size, seed: int = D.seed,
                balance: BalanceOpt = D.balance, max_per_class: MaxOpt = D.max_per_class,
                image_size: SizeOpt = D.image_size, min_lr: float = 1e-6, max_lr: float = 1.0, steps: int = 100,
                classes: ClassesOpt = None,
                workdir: Annotated[Path, typer.Option(help="Feature cache folder.")] = Path("runs/.work")):
    """LR range test: saves the loss-vs-LR plot (log scale) and prints the suggested rate."""
    from covid_cxr.data import prepare
    from covid_cxr.train.lr_find import lr_find

    _quiet()
    cfg = _config(arch=arch, weights=weights, batch_size=batch_size, seed=seed, balance=balance,
                  max_per_class=max_per_class, image_size=image_size, classes=classes)
    try:
        prepared = prepare(data, cfg.classes, cfg.balance, cfg.max_per_class, cfg.seed)
        r = lr_find(prepared, cfg, out, workdir, min_lr, max_lr, steps)
    except UserError as exc:
        fail(str(exc))
    out_console.print(f"suggested learning rate: {r.suggestion:.3g}" if r.suggestion else "no suggestion (flat curve)")
    out_console.print(f"plot: {r.plot}")


def _print_metrics(m: dict, title: str) -> None:
    t = Table(title=title)
    for col in ("Category", "Precision", "Recall", "F1", "Support", "ROC AUC"):
        t.add_column(col)
    for c, e in m["per_class"].items():
        t.add_row(c, f"{e['precision']:.3f}", f"{e['recall']:.3f}", f"{e['f1']:.3f}", str(e["support"]),
                  "–" if e["roc_auc"] is None else f"{e['roc_auc']:.3f}")
    out_console.print(t)
    lo, hi = m["accuracy_ci95"]
    out_console.print(f"accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}–{hi:.3f}, n={m['n']})")
    op = m.get("operating_point")
    if op:  # the table the bundle decides by, beside the argmax one above
        _print_metrics(op["metrics"], f"{title}, operating point: {op['class_name']} when p >= {op['threshold']:.4f}")


@app.command()
def evaluate(model: Annotated[Path, typer.Option("--model", help="MODELS/<name>\\[/<version>]")], data: DataOpt,
             out: Annotated[Optional[Path], typer.Option(help="Report folder.")] = None,
             json_path: Annotated[Optional[Path], typer.Option("--json", help="Write metrics JSON here.")] = None):
    """Evaluate a bundle on any labelled folder: per-class metrics, AUC, confusion matrix, curves."""
    from covid_cxr.evaluate.external import evaluate_folder
    from covid_cxr.utils import atomic_write_json

    _quiet()
    b = open_bundle(model)
    out = out or Path("runs/evaluate") / f"{b.name}-v{b.version}-{data.resolve().name}"
    try:
        m = evaluate_folder(b, data, out)
    except UserError as exc:
        fail(str(exc))
    _print_metrics(m, f"{b.name} v{b.version} on {data}")
    for s in m["skipped"]:
        out_console.print(f"[yellow]skipped[/] {s['path']}: {s['reason']}")
    if m.get("ood_rate") is not None:
        out_console.print(f"out of distribution: {m['ood_rate']:.1%} of the images")
    if json_path:
        atomic_write_json(json_path, _evaluate_json(m))
    out_console.print(f"report: {out / 'metrics.md'}")


def _evaluate_json(m: dict) -> dict:
    """`evaluate --json`: each figure with its bootstrap 95% interval beside it ("ci")."""
    keys = ("precision", "recall", "f1", "support", "ci")
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "ece": m.get("ece"), "brier": m.get("brier"),
            "ood_rate": m.get("ood_rate"), "n": m["n"], "ci": m.get("ci"),
            "per_class": {c: {k: e[k] for k in keys if k in e} for c, e in m["per_class"].items()}}


@app.command()
def compare(models: Annotated[Path, typer.Argument(help="Model repository")],
            out: Annotated[Optional[Path], typer.Option(help="Folder for comparison.md/.csv")] = None):
    """The study's table (Category, Model, Precision, Recall, F1, Accuracy) for every model."""
    from covid_cxr.evaluate.compare import COLUMNS, write_comparison

    try:
        rows, md, csv_path = write_comparison(models, out or models)
    except UserError as exc:
        fail(str(exc))
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
            json_out: Annotated[bool, typer.Option("--json")] = False,
            lungs: Annotated[Optional[Path], typer.Option("--lungs", help="Lung segmentation bundle: add its "
                                                          "sanity check (a failed one: out of distribution?)")] = None):
    """Label and class probabilities per image (through the bundle's ONNX model)."""
    from covid_cxr.data.decode import DecodeError, load_for_model

    b = open_bundle(model)
    seg = _lung_segmenter(lungs)
    h, w = b.input_hw
    results = []
    for p in images:
        try:
            pixels = load_for_model(p, h, w)
            probs, score, inside = b.predict_with_ood(pixels[None])
        except DecodeError as exc:
            results.append({"image": str(p), "error": str(exc)})
            continue
        results.append({"image": str(p), "label": b.classes[int(b.decide(probs)[0])],
                        "probabilities": {c: float(v) for c, v in zip(b.classes, probs[0])},
                        "in_distribution": None if inside is None else bool(inside[0]),
                        "ood_score": None if score is None else float(score[0])})
        if seg is not None:
            from covid_cxr.lungs.segment import sanity_check

            results[-1]["lung_check"] = sanity_check(seg.masks(pixels[None])[0]).as_dict()
    if json_out:
        out_console.print_json(json.dumps({"model": b.name, "version": b.version, "results": results}))
    else:
        t = Table(title=f"{b.name} v{b.version}")
        t.add_column("image")
        t.add_column("label")
        for c in b.classes + (["lung check"] if seg else []):
            t.add_column(c)
        t.add_column("in distribution")
        for r in results:
            if "error" in r:
                t.add_row(r["image"], f"[red]{r['error']}[/]", *[""] * (len(b.classes) + 1 + bool(seg)))
            else:
                t.add_row(r["image"], r["label"], *(f"{r['probabilities'][c]:.3f}" for c in b.classes),
                          *([_lung_text(r["lung_check"])] if seg else []), _gate(r))
        out_console.print(t)
    if any("error" in r for r in results):
        raise typer.Exit(1)


def _gate(r: dict) -> str:
    if r["in_distribution"] is None:
        return "– (no gate in this bundle)"
    return "yes" if r["in_distribution"] else "[red]NO: unlike the training X-rays; do not trust the label[/]"


def _lung_segmenter(lungs: Optional[Path]):
    if lungs is None:
        return None
    from covid_cxr.lungs.segment import LungSegmenter

    try:
        return LungSegmenter.from_bundle(lungs)
    except UserError as exc:
        fail(str(exc))


def _lung_text(check: dict) -> str:
    from rich.markup import escape

    return "ok" if check["ok"] else "[yellow]failed: " + escape("; ".join(check["problems"])) + " (out of distribution?)[/]"


@app.command()
def run(data: DataOpt, out: Annotated[Path, typer.Option("--out")] = Path("runs/run"),
        archs: Annotated[str, typer.Option(help="Comma-separated architectures.")] = D.arch,
        weights: WeightsOpt = D.weights, epochs: Annotated[int, _opt("epochs")] = D.epochs,
        batch_size: Annotated[int, _opt("batch_size")] = D.batch_size, lr: Annotated[float, _opt("lr")] = D.lr,
        seed: int = D.seed, balance: BalanceOpt = D.balance, max_per_class: MaxOpt = D.max_per_class,
        image_size: SizeOpt = D.image_size, hidden: HiddenOpt = HIDDEN_DEFAULT, dropout: DropoutOpt = D.dropout,
        patience: Annotated[int, _opt("patience")] = D.patience, precision: PrecisionOpt = D.precision,
        classes: ClassesOpt = None, target_recall: TargetRecallOpt = D.target_recall, resume: ResumeOpt = False,
        logger: LoggerOpt = D.logger, tracking_uri: TrackingOpt = None):
    """All stages: data -> train each architecture -> evaluate -> compare -> summary report."""
    _run(data, out, archs, False, resume, weights=weights, epochs=epochs, batch_size=batch_size, lr=lr,
         seed=seed, balance=balance, max_per_class=max_per_class, image_size=image_size, hidden=hidden,
         dropout=dropout, patience=patience, precision=precision, classes=classes, target_recall=target_recall,
         logger=logger, tracking_uri=tracking_uri)


def _run(data: Path, out: Path, archs: str, synthetic: bool, resume: bool, **cfg) -> None:
    from covid_cxr.pipeline import run_pipeline

    _quiet()
    arch_list = [a.strip() for a in archs.split(",") if a.strip()]
    base = _config(**cfg)
    for a in arch_list:
        _config(**cfg, arch=a)  # every architecture known before anything runs
    try:
        s = run_pipeline(data, out, arch_list, base, synthetic=synthetic, resume=resume,
                         log=lambda m: console.print(f"[cyan]›[/] {m}"))
    except UserError as exc:
        fail(str(exc))
    from covid_cxr.evaluate.compare import to_markdown

    out_console.print(to_markdown(s["comparison"]))
    out_console.print(f"report: {s['report']}\nmodels: {s['models']}")


@app.command()
def demo(data: Annotated[Optional[Path], typer.Option("--data", help="Real dataset folder; default: "
                                                       "generate a small SYNTHETIC one.")] = None,
         out: Annotated[Path, typer.Option("--out")] = Path("runs/demo"),
         archs: str = "efficientnet_lite0"):
    """The whole pipeline with no download: your data (--data) or a labelled SYNTHETIC set."""
    synthetic = data is None
    if synthetic:
        from covid_cxr.data.synthetic import make_synthetic_dataset

        data = make_synthetic_dataset(out / "synthetic-data")
        console.print(f"[yellow]No --data given: using a generated SYNTHETIC dataset at {data}[/]")
    _run(data, out, archs, synthetic, False, max_per_class=None if synthetic else STUDY_MAX_PER_CLASS)


def _register_plugins() -> None:
    from covid_cxr.bundle.cli import register as register_bundle
    from covid_cxr.bundle.cli import register_ensemble
    from covid_cxr.explain.cli import register as register_explain
    from covid_cxr.export.cli import register as register_export
    from covid_cxr.lungs.cli import register as register_lungs
    from covid_cxr.serve.cli import register as register_serve
    from covid_cxr.trust.cli import register as register_trust

    register_bundle(app)
    register_ensemble(app)
    register_explain(app)
    register_export(app)
    register_lungs(app)
    register_serve(app)
    register_trust(app)


_register_plugins()
