"""Training curves: drawn from the epochs there are; a site head's run (no epochs) still gets a figure."""

import warnings

from PIL import Image

from covid_cxr.evaluate.plots import curves_png


def _png(path):
    with Image.open(path) as im:
        return im.format, im.size


def test_curves_are_drawn_with_a_legend_per_panel(tmp_path):
    hist = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "train_acc": 0.5 + e / 10,
             "val_acc": 0.45 + e / 10} for e in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curves_png(hist, tmp_path / "c.png")
    assert _png(tmp_path / "c.png")[0] == "PNG"


def test_no_epochs_gives_a_figure_and_no_legend_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the empty legend's UserWarning would fail here
        curves_png([], tmp_path / "c.png")
    assert _png(tmp_path / "c.png")[0] == "PNG"
