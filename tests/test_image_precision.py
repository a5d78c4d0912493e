"""Image encoder runtimes (transresnet.image_runtime) against float32 on the tiny checkpoint's test_resnet.

Each mode's features stay within its cosine bound of float32 and rank captions as float32 does; auto picks
a mode that passed and falls back to float32 when every candidate fails (a bound it cannot meet, a
candidate that does not build); ONNX exports are reused for the same fingerprint and rebuilt for another;
without onnxruntime the ONNX modes fall back to PyTorch. The evaluator and the service take the option.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import service_captions, write_image
from transresnet import image_runtime as ir
from transresnet.checkpoint import META, Checkpoint
from transresnet.encode import encode_captions, encode_queries
from transresnet.images import ImagePreprocessor

ONNX_MODES = ("onnx", "int8")
needs_onnx = pytest.mark.skipif(bool(ir.onnx_cache.missing_packages()), reason="the onnx extra is not installed")
needs_openvino = pytest.mark.skipif(bool(ir._missing_for("openvino")), reason="the openvino extra is not installed")
needs_bf16 = pytest.mark.skipif(not ir._cpu_has_bf16(), reason="this CPU has no native bfloat16")


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    return [write_image(folder / f"photo{i}.jpg", size=(48, 40), seed=i) for i in range(40)]


@pytest.fixture(scope="module")
def calibration(tiny_checkpoint: Checkpoint, photo_files: list[Path]) -> torch.Tensor:
    return ir.calibration_from_files(photo_files[:16], tiny_checkpoint.config.model.image)


@pytest.fixture(scope="module")
def held_out(tiny_checkpoint: Checkpoint, photo_files: list[Path]) -> torch.Tensor:
    pre = ImagePreprocessor(tiny_checkpoint.config.model.image)
    return torch.stack([pre.load(p) for p in photo_files[16:]])


def features(runner: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return runner(pixels).float()


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def top_captions(checkpoint: Checkpoint, feats: torch.Tensor, captions: np.ndarray, k: int = 3) -> np.ndarray:
    queries = encode_queries(checkpoint.model, torch.zeros(len(feats), dtype=torch.long), features=feats)
    return np.argsort(-(queries @ captions.T), axis=1)[:, :k]


@pytest.mark.parametrize("mode", ["channels_last", "bfloat16", pytest.param("onnx", marks=needs_onnx),
                                  pytest.param("int8", marks=needs_onnx),
                                  pytest.param("openvino", marks=needs_openvino),
                                  pytest.param("openvino_bf16", marks=[needs_openvino, needs_bf16])])
def test_each_mode_matches_float32_and_ranks_alike(mode: str, tiny_checkpoint: Checkpoint, calibration: torch.Tensor,
                                                   held_out: torch.Tensor, tmp_path: Path) -> None:
    """Bound: on 24 photos it was not calibrated on, every feature vector is within the mode's tolerance of
    float32 (loosened by 0.01 for int8, whose ranges came from other photos), and the top caption of each
    photo's query over 16 captions is the same as float32's for at least 90% of the photos."""
    model = tiny_checkpoint.model
    runner = ir.prepare_image_encoder(model, mode, calibration=calibration, cache_dir=tmp_path)
    assert runner.precision == mode and runner.report.chosen == mode
    assert runner.report.candidates[0].passed
    exact = features(ir.prepare_image_encoder(model, "float32"), held_out)
    got = features(runner, held_out)
    assert got.shape == exact.shape and got.dtype == torch.float32
    slack = 0.01 if mode == "int8" else 0.0
    assert cosines(got, exact).min() >= ir.tolerance(mode) - slack
    captions = encode_captions(model, service_captions()[:16], precision="float32", progress=False)
    same_top = (top_captions(tiny_checkpoint, got, captions)[:, 0]
                == top_captions(tiny_checkpoint, exact, captions)[:, 0]).mean()
    assert same_top >= 0.9


@pytest.mark.slow
def test_compiled_mode_matches_float32(tiny_checkpoint: Checkpoint, calibration: torch.Tensor,
                                       held_out: torch.Tensor) -> None:
    runner = ir.prepare_image_encoder(tiny_checkpoint.model, "compile", calibration=calibration)
    exact = features(ir.prepare_image_encoder(tiny_checkpoint.model, "float32"), held_out[:8])
    assert cosines(features(runner, held_out[:8]), exact).min() >= ir.tolerance("compile")


def test_float32_is_the_model_itself(tiny_checkpoint: Checkpoint, held_out: torch.Tensor) -> None:
    runner = ir.prepare_image_encoder(tiny_checkpoint.model, "float32")
    with torch.inference_mode():
        expected = tiny_checkpoint.model.encode_image(held_out)
    torch.testing.assert_close(features(runner, held_out), expected, rtol=0, atol=0)


@needs_onnx
def test_auto_picks_the_fastest_passing_mode(tiny_checkpoint: Checkpoint, calibration: torch.Tensor,
                                             tmp_path: Path) -> None:
    runner = ir.prepare_image_encoder(tiny_checkpoint.model, "auto", calibration=calibration, cache_dir=tmp_path)
    report = runner.report
    results = {r.name: r for r in report.candidates}
    assert results["float32"].passed and set(results) >= {"float32", "onnx", "int8", "channels_last"}
    assert results[report.chosen].passed and runner.precision == report.chosen
    assert report.chosen == min((r for r in report.candidates if r.passed), key=lambda r: r.cost).name
    for result in report.candidates:
        assert result.passed == (min(result.min_cosine, result.min_query_cosine) >= result.tolerance)
        # auto holds every reduced mode to the float32 runtimes' bound (0.99 did not keep image recall)
        assert result.tolerance == ir.tolerance(result.name, auto=True)
        assert result.batch1_ms > 0 and result.per_image_ms > 0
    assert ir.tolerance("int8", auto=True) == ir.tolerance("onnx") > ir.tolerance("int8")
    assert report.chosen in report.reason and "16 photos" in report.calibration


def test_auto_falls_back_to_float32_when_every_candidate_fails(tiny_checkpoint: Checkpoint,
                                                               calibration: torch.Tensor, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A bound no reduced mode can meet, and a candidate that does not build: neither is ever used."""
    strict = {mode: 1.01 for mode in ir.PRECISIONS}
    with caplog.at_level(logging.WARNING, logger="transresnet.image_runtime"):
        runner = ir.prepare_image_encoder(tiny_checkpoint.model, "auto", calibration=calibration, cache_dir=tmp_path,
                                          candidates=["channels_last", "bfloat16", "no-such-runtime"],
                                          tolerances=strict)
    assert runner.report.chosen == "float32" == runner.precision
    results = {r.name: r for r in runner.report.candidates}
    assert not results["channels_last"].passed and results["channels_last"].min_cosine > 0.999
    assert results["no-such-runtime"].error is not None and not results["no-such-runtime"].passed
    assert "drifts from float32" in caplog.text and "does not run here" in caplog.text


def test_an_explicit_mode_that_drifts_is_refused(tiny_checkpoint: Checkpoint, calibration: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="drifts from float32"):
        ir.prepare_image_encoder(tiny_checkpoint.model, "bfloat16", calibration=calibration,
                                 tolerances={"bfloat16": 1.01})


def test_without_photos_the_check_runs_on_synthetic_images(tiny_checkpoint: Checkpoint,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="transresnet.image_runtime"):
        runner = ir.prepare_image_encoder(tiny_checkpoint.model, "channels_last")
    assert "no calibration photos" in caplog.text and runner.report.calibration.startswith("synthetic")
    cfg = tiny_checkpoint.config.model.image
    torch.testing.assert_close(ir.synthetic_calibration(cfg), ir.synthetic_calibration(cfg))  # deterministic


@needs_onnx
def test_onnx_export_is_cached_by_fingerprint(tiny_checkpoint: Checkpoint, calibration: torch.Tensor,
                                              tmp_path: Path) -> None:
    model = tiny_checkpoint.model
    first = ir.prepare_image_encoder(model, "onnx", calibration=calibration, cache_dir=tmp_path).engine
    model_file = first.folder / "image.onnx.onnx"
    meta = json.loads((first.folder / META).read_text())
    assert meta["key"]["fingerprint"] == ir.image_fingerprint(model.backbone, model.config.image)
    assert meta["key"]["input"] == [3, 32, 32] and meta["key"]["mode"] == "onnx"
    stamp = model_file.stat().st_mtime_ns
    again = ir.prepare_image_encoder(model, "onnx", calibration=calibration, cache_dir=tmp_path).engine
    assert again.folder == first.folder and model_file.stat().st_mtime_ns == stamp  # read, not exported again

    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.backbone.parameters()).mul_(1.5)
    other = ir.prepare_image_encoder(changed, "onnx", calibration=calibration, cache_dir=tmp_path).engine
    assert other.folder != first.folder and model_file.stat().st_mtime_ns == stamp
    # Each export serves its own weights.
    exact = features(ir.prepare_image_encoder(changed, "float32"), calibration)
    assert cosines(other(calibration), exact).min() >= ir.tolerance("onnx")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


@needs_onnx
def test_int8_export_follows_its_calibration_photos(tiny_checkpoint: Checkpoint, calibration: torch.Tensor,
                                                    held_out: torch.Tensor, tmp_path: Path) -> None:
    model = tiny_checkpoint.model
    first = ir.prepare_image_encoder(model, "int8", calibration=calibration, cache_dir=tmp_path).engine
    other = ir.prepare_image_encoder(model, "int8", calibration=torch.cat([calibration, held_out[:8]]),
                                     cache_dir=tmp_path).engine
    assert other.folder != first.folder


@needs_onnx
def test_a_corrupted_export_is_rebuilt(tiny_checkpoint: Checkpoint, calibration: torch.Tensor, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_checkpoint.model
    folder = ir.prepare_image_encoder(model, "onnx", calibration=calibration, cache_dir=tmp_path).engine.folder
    target = folder / "image.onnx.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    target.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        runner = ir.prepare_image_encoder(model, "onnx", calibration=calibration, cache_dir=tmp_path)
    assert "exporting it again" in caplog.text and runner.engine.folder == folder
    assert json.loads((folder / META).read_text())["sha256"] == ir.onnx_cache.sha256_file(target)


def test_without_onnxruntime_onnx_falls_back_to_pytorch(tiny_checkpoint: Checkpoint, calibration: torch.Tensor,
                                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails, find_spec says absent
    for mode in ONNX_MODES:
        runner = ir.prepare_image_encoder(tiny_checkpoint.model, mode, calibration=calibration, cache_dir=tmp_path)
        assert runner.precision == "channels_last" and "onnxruntime" in runner.report.reason
    auto = ir.prepare_image_encoder(tiny_checkpoint.model, "auto", calibration=calibration, cache_dir=tmp_path)
    assert not {"onnx", "int8"} & {r.name for r in auto.report.candidates}
    assert "int8 (no onnxruntime)" in auto.report.reason
    assert not list(tmp_path.iterdir())  # nothing was exported


@needs_openvino
def test_openvino_compiles_the_onnx_export_and_is_thread_safe(tiny_checkpoint: Checkpoint, calibration: torch.Tensor,
                                                              held_out: torch.Tensor, tmp_path: Path) -> None:
    """OpenVINO reads the float32 ONNX export (one export for both runtimes), matches float32 to 1e-4, and
    answers the same from two threads at once (each thread has its own infer request)."""
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_checkpoint.model
    runner = ir.prepare_image_encoder(model, "openvino", calibration=calibration, cache_dir=tmp_path)
    onnx_runner = ir.prepare_image_encoder(model, "onnx", calibration=calibration, cache_dir=tmp_path)
    assert [p.name.split("-")[0:2] for p in tmp_path.iterdir()] == [["image", "onnx"]]
    assert runner.engine.folder == onnx_runner.engine.folder and runner.identity != onnx_runner.identity
    exact = features(ir.prepare_image_encoder(model, "float32"), held_out)
    torch.testing.assert_close(features(runner, held_out), exact, rtol=1e-4, atol=1e-4)
    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(lambda chunk: features(runner, chunk), [held_out[:12], held_out[12:]] * 3))
    torch.testing.assert_close(torch.cat(outputs[:2]), exact, rtol=1e-4, atol=1e-4)


def test_without_openvino_its_modes_fall_back_to_pytorch(tiny_checkpoint: Checkpoint, calibration: torch.Tensor,
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    runner = ir.prepare_image_encoder(tiny_checkpoint.model, "openvino", calibration=calibration, cache_dir=tmp_path)
    assert runner.precision == "channels_last" and "transresnet[openvino]" in runner.report.reason
    if ir._cpu_has_bf16():
        bf16 = ir.prepare_image_encoder(tiny_checkpoint.model, "openvino_bf16", calibration=calibration,
                                        cache_dir=tmp_path)
        assert bf16.precision == "bfloat16" and "openvino" in bf16.report.reason
    auto = ir.prepare_image_encoder(tiny_checkpoint.model, "auto", calibration=calibration, cache_dir=tmp_path,
                                    candidates=["openvino", "channels_last"])
    assert "openvino" not in {r.name for r in auto.report.candidates}
    assert "openvino (no openvino)" in auto.report.reason


def test_runner_serves_the_model_and_keeps_its_grid(tiny_checkpoint: Checkpoint, calibration: torch.Tensor,
                                                    held_out: torch.Tensor) -> None:
    model = copy.deepcopy(tiny_checkpoint.model)
    exact = features(model.backbone, held_out)
    report = ir.apply_image_precision(model, "channels_last", calibration=calibration)
    assert isinstance(model.backbone, ir.ImageRunner) and report.chosen == "channels_last"
    assert ir.apply_image_precision(model, "channels_last") is report  # installed once
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_image(held_out), exact, rtol=1e-4, atol=1e-5)
        assert model.backbone.forward_features(held_out[:2]).ndim == 4


def test_feature_cache_keeps_runtimes_apart(tiny_checkpoint: Checkpoint) -> None:
    from transresnet.features import cache_key

    cfg = tiny_checkpoint.config.model.image
    pre = ImagePreprocessor(cfg)
    assert cache_key(cfg, pre, weights="w") == cache_key(cfg, pre, weights="w", runtime="float32")
    assert cache_key(cfg, pre, weights="w", runtime="int8:a") != cache_key(cfg, pre, weights="w")
    assert cache_key(cfg, pre, weights="w", runtime="int8:a") != cache_key(cfg, pre, weights="w", runtime="int8:b")


@needs_onnx
def test_eval_reports_recall_with_an_image_precision(tiny_checkpoint: Checkpoint, photo_files: list[Path],
                                                     tmp_path: Path) -> None:
    import csv

    from transresnet.index.evaluate import run_eval

    from transresnet.options import EvalOptions

    data = tmp_path / "captions.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "split", "caption"])
        for i, path in enumerate(photo_files[:12]):
            writer.writerow([str(path), "val", service_captions()[i % len(service_captions())] + f" {i}"])
    reports = {}
    for precision in ("float32", "onnx"):
        options = EvalOptions(checkpoint=tiny_checkpoint.path, data=data, split="val", index_type="flat",
                              out=tmp_path / precision, feature_cache=tmp_path / "features", device="cpu",
                              image_precision=precision)
        reports[precision] = run_eval(options)
    assert reports["onnx"]["image_encoder"]["chosen"] == "onnx"
    assert reports["float32"]["image_encoder"]["chosen"] == "float32"
    exact = {r["direction"]: r["metrics"] for r in reports["float32"]["results"] if r["search"] == "exact"}
    onnx = {r["direction"]: r["metrics"] for r in reports["onnx"]["results"] if r["search"] == "exact"}
    assert onnx == exact  # float32 arithmetic in another runtime: the same ranks
    assert len(list((tmp_path / "features").iterdir())) == 2  # cached apart


def test_eval_flag_and_service_setting_share_one_choice_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from transresnet.service.settings import ServiceSettings

    from transresnet.cli import build_parser
    from transresnet.options import ImagePrecision, choices

    monkeypatch.setenv("TRANSRESNET_IMAGE_PRECISION", "int8")
    assert ServiceSettings(_env_file=None).image_precision == "int8"
    monkeypatch.setenv("TRANSRESNET_IMAGE_PRECISION", "float8")
    with pytest.raises(ValueError):
        ServiceSettings(_env_file=None)
    args = build_parser().parse_args(["eval", "--checkpoint", "c", "--data", "d", "--out", "o",
                                      "--image-precision", "auto"])
    assert args.image_precision == "auto" and set(ir.PRECISIONS) == set(choices(ImagePrecision))


def test_service_bundle_applies_its_image_precision(tiny_checkpoint: Checkpoint, service_index_root: Path,
                                                    held_out: torch.Tensor) -> None:
    from transresnet.service.bundle import load_bundle

    bundle = load_bundle(tiny_checkpoint.path, service_index_root, device="cpu", image_precision="channels_last")
    model = bundle.checkpoint.model
    assert isinstance(model.backbone, ir.ImageRunner) and bundle.image_encoder["chosen"] == "channels_last"
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_image(held_out), tiny_checkpoint.model.encode_image(held_out),
                                   rtol=1e-4, atol=1e-5)
    plain = load_bundle(tiny_checkpoint.path, service_index_root, device="cpu")
    assert not isinstance(plain.checkpoint.model.backbone, ir.ImageRunner)
    assert plain.image_encoder["chosen"] == "float32"
