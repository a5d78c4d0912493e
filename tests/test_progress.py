"""Progress off a terminal: log lines with done/total, rate and ETA from the one reporter."""

from __future__ import annotations

import logging

import pytest

import transresnet.progress as progress_module
from transresnet.checkpoint import Checkpoint
from transresnet.encode import encode_captions
from transresnet.progress import LogProgress, progress


def test_off_a_terminal_progress_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="transresnet.progress"):
        with progress(4, "caching the centre crop for 4 photos", "photos", interval=0.0) as bar:
            assert isinstance(bar, LogProgress)  # pytest's captured stderr is not a terminal
            for _ in range(4):
                bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("caching the centre crop for 4 photos: 1/4 photos (")
    assert "/s, ETA " in lines[0]
    assert lines[-1].startswith("caching the centre crop for 4 photos: 4/4 photos") and "done in" in lines[-1]


def test_short_steps_stay_quiet(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="transresnet.progress"), progress(3, "quick", interval=60) as bar:
        bar.update(3)
    assert not caplog.records


def test_caption_encoding_reports_progress(tiny_checkpoint: Checkpoint, caplog: pytest.LogCaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)
    with caplog.at_level(logging.INFO, logger="transresnet.progress"):
        encode_captions(tiny_checkpoint.model, [f"caption {i}" for i in range(40)], batch_size=8,
                        precision="float32")
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("encoding 40 captions: 40/40 captions") for line in lines), lines


def test_third_party_progress_bars_stay_out_of_normal_output(tiny_text_model) -> None:
    import os
    import subprocess
    import sys

    code = ("from transresnet.runtime import apply_runtime_defaults; apply_runtime_defaults(); "
            f"from transformers import AutoModel; AutoModel.from_pretrained({str(tiny_text_model)!r})")
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "Loading weights" not in result.stderr and "%|" not in result.stderr


def test_training_off_a_terminal_logs_epoch_progress(tiny_text_model, tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from tests.helpers import CONFIGS_DIR
    from transresnet.cli import main

    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.0)
    monkeypatch.chdir(tmp_path)
    small = ["data.synthesize=30", "train.epochs=1", f"model.text.model={tiny_text_model}",
             "model.text.max_length=16", "model.hidden_dim=16", "train.batch_size=50"]
    with caplog.at_level(logging.INFO, logger="transresnet.progress"):
        assert main(["train", "--config", str(CONFIGS_DIR / "synthetic.yaml"), "--out", "run",
                     *[part for item in small for part in ("--set", item)]]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("epoch 1 of 1: ") and "batches" in line and "loss" in line for line in lines), lines
    assert any(line.startswith("caching text features of ") for line in lines), lines
