"""An operating point: a decision threshold on one class's probability, chosen on the validation
split to reach a target recall (screening wants COVID-19 sensitivity more than accuracy).

Rule: predict the class when its probability reaches the threshold, otherwise the argmax. The
threshold only ever *adds* predictions of that class, so its recall is never below the argmax's;
the price is paid by the other classes' recall (the report prints both tables). numpy only: the
server, `predict` and `evaluate` apply it without torch.
"""

from __future__ import annotations

import math
import re

import numpy as np

from covid_cxr.core.config import parse_target  # noqa: F401  (the operating point's spec; lives with the config)
from covid_cxr.core.errors import ConfigError

def fit_threshold(y: np.ndarray, probs: np.ndarray, index: int, target: float) -> float:
    """The largest threshold t such that at least `target` of class `index`'s images have p >= t."""
    scores = np.sort(np.asarray(probs)[np.asarray(y) == index, index])[::-1]
    if len(scores) == 0:
        raise ConfigError("--target-recall: the validation split has no image of that class")
    k = max(1, math.ceil(target * len(scores) - 1e-9))
    return float(scores[k - 1])


from covid_cxr.bundle.schema import decide  # noqa: E402  (the rule lives with the bundle's contract)


def choose(y_val: np.ndarray, p_val: np.ndarray, classes, spec: str) -> dict:
    """The bundle's `operating_point` entry, fitted on the validation split."""
    name, target = parse_target(spec)
    if name not in classes:
        raise ConfigError(f"--target-recall: unknown class {name!r}; classes: {list(classes)}")
    i = list(classes).index(name)
    t = fit_threshold(y_val, p_val, i, target)
    pos = np.asarray(y_val) == i
    val_recall = float((decide(p_val, i, t)[pos] == i).mean())
    return {"class_name": name, "threshold": t, "target_recall": target, "val_recall": val_recall,
            "val_images": int(pos.sum()), "fitted_on": "validation split"}


def op_index(op, classes) -> tuple[int | None, float | None]:
    """(class index, threshold) of an operating point (dict or OperatingPoint), or (None, None)."""
    if op is None:
        return None, None
    get = op.get if isinstance(op, dict) else (lambda k: getattr(op, k))
    return list(classes).index(get("class_name")), float(get("threshold"))
