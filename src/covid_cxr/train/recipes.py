"""Named training recipes (`covid-cxr train --recipe NAME`): each recipe's settings live here, with
the measurements that chose them (docs/results/NOTE.md; benchmarks/bench_accuracy.py makes the table).

A recipe is one or more member configurations (TrainConfig fields over the defaults). One member:
an ordinary bundle. Several: each member is trained on the same split (same seed) into the work
folder, and one ensemble bundle averaging them is written as MODELS/<name>/<version>.
Options given on the command line (TrainConfig.model_fields_set) win over the recipe, even when a
given value equals the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from covid_cxr.core.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    members: tuple[dict, ...]
    why: str
    common: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    # The study's protocol: 219 images per class (undersampled), frozen backbone + head.
    "study": Recipe(({"arch": "efficientnet_lite0"},), "the study's protocol (NOTE.md of the first release)",
                    {"balance": "undersample", "max_per_class": 219}),
    # Chosen from the configuration table (docs/results/ACCURACY.md, benchmarks/bench_accuracy.py; all
    # images, class weights, test n = 621). Stop 13, seed-0 split: frozen lite0 224 0.953 / COVID-19
    # recall 0.920; staged fine-tuning (3 cached views, 8 stage-2 epochs) lite0 0.971, lite1 0.957,
    # lite2 0.960; their ensemble 0.979 / 0.947, the best row. Stop 14: the same ensemble with members
    # at 256 px (frozen lite0 had gained 1.3 points from 224 to 256): on validation, log loss 0.063 vs
    # 0.073 and 0.069 vs 0.076 (seeds 0, 1), COVID-19 ROC AUC 0.9984 vs 0.9980 and 0.9976 vs 0.9974,
    # argmax accuracy 0.979 vs 0.986 and 0.976 vs 0.981 (benchmarks/val_compare.py); on the test
    # splits of seeds 0/1/2 at the operating point: COVID-19 recall 0.982 / 0.991 / 0.974 (224 px:
    # 0.969 / 0.991 / 0.969), accuracy 0.977 / 0.982 / 0.976; 20-26 min. Operating point: fitted on the
    # validation split (227 COVID-19 images) at 0.98, i.e. the 0.97 wanted plus about one standard
    # error of a recall measured on 227 images (sqrt(0.97 x 0.03 / 227) = 0.011), because a threshold
    # fitted to exactly 0.97 reaches it on new images only about half the time. lr_find off: the rows
    # were trained at the default lr, and the recipe repeats them.
    "accurate": Recipe(
        tuple({"arch": f"efficientnet_lite{i}", "image_size": 256, "finetune": True, "finetune_views": 3,
               "finetune_epochs": 8} for i in (0, 1, 2)),
        "ensemble of staged fine-tuned lite0/1/2 at 256 px on all images, COVID-19 operating point 0.98",
        {"balance": "weights", "target_recall": "COVID-19=0.98", "lr_find": False}),
}


def recipe_configs(name: str, base) -> list:
    """The member TrainConfigs of recipe `name` over `base` (a TrainConfig from the CLI)."""
    try:
        recipe = RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None
    given = {k: getattr(base, k) for k in base.model_fields_set if k != "name"}  # what the user typed
    out = []
    for i, member in enumerate(recipe.members):
        fields = {**base.model_dump(), **recipe.common, **member, **given}  # explicit options win
        fields["name"] = (base.name or name) if len(recipe.members) == 1 else f"{name}-member{i}"
        out.append(type(base)(**fields))
    return out


def train_recipe(name: str, data, models_out: Path, base, resume: bool = False):
    """Train recipe `name`; returns (bundle path, test metrics)."""
    from covid_cxr.train.fit import train

    cfgs = recipe_configs(name, base)
    bundle_name = base.name or name
    if len(cfgs) == 1:
        r = train(data, models_out, cfgs[0], resume=resume)
        return r.bundle_path, r.metrics
    from covid_cxr.publish.ensemble import build_ensemble

    members_dir = Path(models_out) / ".work" / "recipe-members"
    paths = [train(data, members_dir, c, workdir=Path(models_out) / ".work", resume=resume).bundle_path for c in cfgs]
    b = build_ensemble(paths, models_out, bundle_name, target_recall=cfgs[0].target_recall)  # the recipe's, or the CLI's
    return b.path, b.metadata.test_metrics.model_dump()
