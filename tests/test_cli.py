"""The command line fails politely (one line, non-zero exit, traceback only with -v) and every config trains."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CONFIGS_DIR, REPO
from transresnet.checkpoint import Checkpoint, load_checkpoint
from transresnet.cli import main


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_missing_config_is_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run")]) == 2
    (message,) = _errors(caplog)
    assert "nope.yaml" in message and "\n" not in message
    assert not any(r.exc_info for r in caplog.records)


def test_a_file_in_the_way_of_the_output_is_one_line(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog\na cat\nthe sea\n")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.ERROR):
        assert main(["index", "build", "--checkpoint", str(tiny_checkpoint.path), "--captions", str(captions),
                     "--out", str(blocker / "index")]) == 2
    (message,) = _errors(caplog)
    assert str(blocker) in message and "\n" not in message


def test_invalid_options_are_refused_before_anything_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["index", "build", "--checkpoint", str(tmp_path), "--captions", str(tmp_path / "c.txt"),
                     "--out", str(tmp_path / "i"), "--recall-target", "1.5"]) == 2
    assert "--recall-target" in _errors(caplog)[0] and "less than or equal to 1" in _errors(caplog)[0]


def test_faiss_refusing_bad_input_is_one_line(tiny_checkpoint: Checkpoint, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(f"caption number {i}" for i in range(300)))
    with caplog.at_level(logging.ERROR):
        assert main(["index", "build", "--checkpoint", str(tiny_checkpoint.path), "--captions", str(captions),
                     "--out", str(tmp_path / "i"), "--type", "ivfpq", "--pq-m", "7"]) == 2
    (message,) = _errors(caplog)
    assert "7" in message and "\n" not in message


def test_an_interrupted_run_exits_130(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transresnet.train

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(transresnet.train, "train", interrupted)
    assert main(["train", "--config", str(CONFIGS_DIR / "synthetic.yaml"), "--out", str(tmp_path / "run")]) == 130


def test_verbose_shows_the_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["-v", "index", "info", str(tmp_path / "nothing")]) == 2
    assert any(r.exc_info for r in caplog.records)


def test_the_version_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "transresnet", "--version"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.startswith("transresnet ")


def test_the_synthetic_config_trains_as_written_on_a_fresh_clone(tiny_text_model: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/synthetic.yaml from an empty folder: its data are drawn on first use (data.synthesize)."""
    monkeypatch.chdir(tmp_path)  # the config's relative .cache/synthetic paths land here
    small = ["data.synthesize=40", "train.epochs=1", f"model.text.model={tiny_text_model}",
             "model.text.max_length=16", "model.hidden_dim=16"]
    args = ["train", "--config", str(REPO / "configs" / "synthetic.yaml"), "--out", "run"]
    assert main([*args, *[part for item in small for part in ("--set", item)]]) == 0
    assert (tmp_path / ".cache" / "synthetic" / "captions.csv").is_file()
    assert load_checkpoint(tmp_path / "run" / "best").traits.lookup("Sweet") > 0


@pytest.mark.parametrize("argv", [
    ["train", "--config", str(CONFIGS_DIR / "flickr8k.yaml"), "--out", "run", "--set", "data.train=/nope.csv"],
    ["train", "--config", str(CONFIGS_DIR / "synthetic.yaml"), "--out", "run", "--set", "train.epoch=3"],
    ["eval", "--checkpoint", "/nope", "--data", "/nope.csv", "--out", "out"],
    ["index", "build", "--checkpoint", "/nope", "--captions", "/nope.txt", "--out", "out"],
])
def test_wrong_inputs_fail_before_torch_loads(argv: list[str], tmp_path: Path) -> None:
    code = ("import sys; from transresnet.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'faiss', 'transformers') if m in sys.modules]; "
            "assert rc == 2 and not heavy, (rc, heavy)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stderr.splitlines() if "ERROR" in line]) == 1


def _serve_failure(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transresnet", "serve", *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_serve_on_a_busy_port_is_one_line_before_the_url(tiny_checkpoint: Checkpoint, service_index_root: Path,
                                                          tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _serve_failure(["--checkpoint", str(tiny_checkpoint.path), "--index", str(service_index_root),
                                 "--port", str(port)], tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "--port" in errors[0]
    assert "TRANSRESNET_PORT" in errors[0] and "http://" not in result.stderr and "Traceback" not in result.stderr


def test_serve_with_a_damaged_checkpoint_or_an_empty_index_is_one_line(tiny_checkpoint: Checkpoint,
                                                                      service_index_root: Path,
                                                                      tmp_path: Path) -> None:
    import shutil

    from tests.helpers import free_port

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_checkpoint.path, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    (tmp_path / "empty-index").mkdir()
    for checkpoint, index, expected in ((damaged, service_index_root, "model.safetensors"),
                                        (tiny_checkpoint.path, tmp_path / "empty-index", "no published index")):
        result = _serve_failure(["--checkpoint", str(checkpoint), "--index", str(index), "--port",
                                 str(free_port())], tmp_path)
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
        assert result.returncode == 2 and len(errors) == 1 and expected in errors[0], result.stderr
        assert "http://" not in result.stderr and "Traceback" not in result.stderr


def test_every_flag_has_help_without_none_defaults_or_backticks() -> None:
    import argparse

    from transresnet.cli import build_parser

    problems = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.dest != "help" and (not action.help or "default: None" in action.help
                                            or "`" in action.help):
                problems.append(f"{path} {'/'.join(action.option_strings) or action.dest}: {action.help!r}")

    walk(build_parser(), "transresnet")
    assert problems == []


def test_serve_flags_become_service_settings() -> None:
    """Every serve flag lands on its ServiceSettings field; flags left out leave the environment's alone."""
    from transresnet.service.settings import ServiceSettings

    from transresnet.cli import build_parser
    from transresnet.cli.serve import _overrides

    args = build_parser().parse_args(["serve", "--mmap", "--follow-index", "2.5", "--index-placement", "cpu",
                                      "--no-batching", "--max-batch", "8"])
    settings = ServiceSettings(**_overrides(args))
    assert (settings.index_mmap, settings.follow_index, settings.index_placement) == (True, 2.5, "cpu")
    assert (settings.batching, settings.max_batch) == (False, 8)
    assert _overrides(build_parser().parse_args(["serve"])) == {}
