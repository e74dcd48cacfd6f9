"""A failed or interrupted `train` leaves only what --resume needs: no empty run folder, no half-built
report, no folders it made for nothing; an interrupted run's checkpoint survives and resumes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest

from covid_cxr.bundle import load_bundle
from covid_cxr.core.errors import UserError
from covid_cxr.train.fit import TrainConfig, train

TINY = dict(weights="none", image_size=64, progress=False, logger="none")


def test_a_run_that_fails_on_its_data_leaves_nothing(tiny_data, tmp_path):
    data = tmp_path / "one-class"
    shutil.copytree(tiny_data / "Normal", data / "Normal")
    with pytest.raises(UserError, match="no folder for class"):
        train(data, tmp_path / "models" / "repo", TrainConfig(epochs=1, **TINY))
    assert not (tmp_path / "models").exists()  # was .work/<run id>/ (empty) under a new MODELS
    (tmp_path / "kept").mkdir()  # a folder that was there before stays, even empty
    with pytest.raises(UserError):
        train(data, tmp_path / "kept", TrainConfig(epochs=1, **TINY))
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def _train_cli(data, out, *extra):
    cmd = [sys.executable, "-m", "covid_cxr", "train", "--data", str(data), "--out", str(out), "--weights", "none",
           "--image-size", "64", "--logger", "none", "--name", "tiny", *extra]
    # SIGINT as at a terminal, even when the suite itself runs as a background job (which starts
    # with SIGINT ignored, inherited by its children: Python would then never raise KeyboardInterrupt)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
def test_an_interrupted_run_keeps_its_checkpoint_and_resumes(tiny_data, tmp_path):
    """Ctrl-C (SIGINT) once the first epoch's checkpoint exists: the checkpoint stays, the report
    being built and the bundle do not; `--resume` then finishes from it."""
    import torch

    out = tmp_path / "models"
    proc = _train_cli(tiny_data, out, "--epochs", "3000", "--patience", "3000")
    deadline = time.monotonic() + 240
    while not list(out.glob(".work/*/checkpoints/last.ckpt")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, text[-2000:]
    (ckpt,) = out.glob(".work/*/checkpoints/last.ckpt")
    run = ckpt.parent.parent
    assert not (run / "report").exists() and not (out / "tiny").exists()
    done = torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] + 1  # epochs completed
    proc = _train_cli(tiny_data, out, "--epochs", str(done + 2), "--patience", "3000", "--resume")
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, text[-3000:]
    assert load_bundle(out / "tiny").metadata.training.history.epochs_run == done + 2
