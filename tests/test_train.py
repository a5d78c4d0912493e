"""Training on synthetic data must learn, must use the personality, and must resume."""

import json
from pathlib import Path

import pytest
import torch

from transresnet.checkpoint import load_checkpoint
from transresnet.config import build_config
from transresnet.train import train


@pytest.fixture(scope="module")
def synthetic_data(synthetic_dataset: Path) -> Path:
    """The folder of the session's synthetic dataset (conftest)."""
    return synthetic_dataset.parent


def synthetic_config(data: Path, tmp: Path, **train_overrides):
    """The demo's recipe shrunk for a CPU test: 32 px, a bag-of-words text encoder, a few epochs."""
    tree = {
        "model": {
            "image": {"backbone": "test_resnet", "image_size": 32, "resize_size": 32, "mean": [0.5] * 3,
                      "std": [0.5] * 3, "freeze_backbone": False, "hidden_layers": 1, "dropout": 0.0},
            "personality": {"traits_file": str(data / "personalities.txt")},
            "text": {"kind": "bow", "bow_embed_dim": 64, "dropout": 0.0},
            "hidden_dim": 64,
        },
        "data": {"train": str(data / "captions.csv"), "val": str(data / "val.json"), "test": str(data / "test.json"),
                 "examples_per_image": 5, "feature_cache": str(tmp / "features")},
        "train": {"epochs": 14, "batch_size": 100, "lr": 3e-3, "device": "cpu", "patience": 20, **train_overrides},
    }
    return build_config(tree)


@pytest.mark.slow
def test_synthetic_training_learns_and_uses_the_personality(synthetic_data: Path, tmp_path: Path) -> None:
    result = train(synthetic_config(synthetic_data, tmp_path), tmp_path / "run")
    report = result.metrics
    # 100 candidates per query: chance R@1 is 1%.
    assert report["test"]["R@1"] >= 50, report["test"]
    assert report["test_traits_shuffled"]["R@1"] <= report["test"]["R@1"] / 2
    assert report["test_traits_none"]["R@1"] <= report["test"]["R@1"] / 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 14 and json.loads(lines[-1])["val"]["R@1"] > json.loads(lines[0])["val"]["R@1"]
    assert load_checkpoint(result.best_checkpoint).fingerprint


def test_resume_continues_where_it_stopped(synthetic_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(synthetic_config(synthetic_data, tmp_path, epochs=1, max_steps_per_epoch=2), run)
    resumed = train(synthetic_config(synthetic_data, tmp_path, epochs=2, max_steps_per_epoch=2), run, resume=True)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert resumed.best_checkpoint.is_dir()
    state = run / "states" / (run / "LAST").read_text().strip()
    assert (run / "config.yaml").is_file() and (state / "train_state.safetensors").is_file()
    assert json.loads((state / "train_state.json").read_text())["progress"]["epoch"] == 2
    assert load_checkpoint(state).fingerprint  # a state is a checkpoint too


def test_resume_without_a_run_is_a_clear_error(synthetic_data: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(synthetic_config(synthetic_data, tmp_path, epochs=1), tmp_path / "empty", resume=True)


def test_frozen_backbone_features_are_cached_once(synthetic_data: Path, tmp_path: Path, caplog) -> None:
    config = synthetic_config(synthetic_data, tmp_path, epochs=1, max_steps_per_epoch=1)
    config.model.image.freeze_backbone = True
    train(config, tmp_path / "a")
    caches = list((tmp_path / "features").iterdir())
    assert len(caches) == 1 and (caches[0] / "features.npy").is_file()
    caplog.clear()
    with caplog.at_level("INFO", logger="transresnet.features"):
        train(config, tmp_path / "b")
    assert not any("cached" in r.message for r in caplog.records), "second run recomputed features"


# ------------------------------------------------------------------------------------ exact resume


def resume_config(data: Path, features: Path, *, frozen: bool, epochs: int = 4, **train_overrides):
    """Everything that draws random numbers switched on: dropout everywhere, cached crops or live images,
    hard negatives, several examples per image; 3 steps per epoch keep it fast."""
    tree = {
        "model": {
            "image": {"backbone": "test_resnet", "image_size": 32, "resize_size": 32, "mean": [0.5] * 3,
                      "std": [0.5] * 3, "freeze_backbone": frozen, "hidden_layers": 1, "dropout": 0.2},
            "personality": {"traits_file": str(data / "personalities.txt"), "dropout": 0.1},
            "text": {"kind": "bow", "bow_embed_dim": 32, "dropout": 0.1},
            "hidden_dim": 32,
        },
        "data": {"train": str(data / "captions.csv"), "val": str(data / "val.json"), "examples_per_image": 2,
                 "feature_cache": str(features), "augment_crops": 2 if frozen else 0},
        "train": {"epochs": epochs, "batch_size": 50, "lr": 3e-3, "device": "cpu", "patience": 20,
                  "max_steps_per_epoch": 3, "hard_negatives": 3, **train_overrides},
    }
    return build_config(tree)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_state(run: Path) -> Path:
    return run / "states" / (run / "LAST").read_text().strip()


def assert_same_tensors(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_no_leftovers(run: Path) -> None:
    hidden = [p.name for p in (*run.iterdir(), *(run / "states").iterdir()) if p.name.startswith(".")]
    assert not hidden, hidden


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache for the cached-crop runs of this module (the first run fills it)."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def straight_run(synthetic_data: Path, features: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 3-epoch run (cached crops) the interrupted ones are compared with."""
    root = tmp_path_factory.mktemp("straight")
    train(resume_config(synthetic_data, features, frozen=True, epochs=3), root / "run")
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["best"] for r in records[1:]), "the kill tests need best/ replaced after epoch 1"
    return root / "run"


def assert_same_run(run: Path, reference: Path) -> None:
    """Loss of every epoch, final weights, optimizer and RNG states, best/ and the report all equal."""
    assert losses(run) == losses(reference)
    for name in ("model.safetensors", "train_state.safetensors"):
        assert_same_tensors(final_state(run) / name, final_state(reference) / name)
    assert_same_tensors(run / "best" / "model.safetensors", reference / "best" / "model.safetensors")
    assert json.loads((run / "report.json").read_text())["val"] == \
        json.loads((reference / "report.json").read_text())["val"]


def test_resumed_run_reproduces_the_uninterrupted_one(synthetic_data: Path, features: Path, straight_run: Path,
                                                      tmp_path: Path) -> None:
    """3 epochs straight vs 1 + resume to 3, with cached crops: bit for bit the same run.

    The straight run computed the image features, this one finds them cached: that must not matter either.
    """
    run = tmp_path / "run"
    train(resume_config(synthetic_data, features, frozen=True, epochs=1), run)
    assert len(losses(run)) == 1
    train(resume_config(synthetic_data, features, frozen=True, epochs=3), run, resume=True)
    assert_same_run(run, straight_run)
    assert len(list((run / "states").iterdir())) == 2  # the newest two are kept
    assert_no_leftovers(run)


@pytest.mark.slow
def test_resumed_run_reproduces_the_uninterrupted_one_with_a_live_backbone(synthetic_data: Path,
                                                                         tmp_path: Path) -> None:
    """The backbone training end to end (batch-norm statistics, dropout on live features)."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    train(resume_config(synthetic_data, tmp_path / "features", frozen=False, epochs=3), straight)
    train(resume_config(synthetic_data, tmp_path / "features", frozen=False, epochs=1), run)
    train(resume_config(synthetic_data, tmp_path / "features", frozen=False, epochs=3), run, resume=True)
    assert_same_run(run, straight)


def test_resume_skips_a_damaged_newest_state(synthetic_data: Path, features: Path, straight_run: Path,
                                             tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    config = resume_config(synthetic_data, features, frozen=True, epochs=3)
    train(config, run)
    newest = final_state(run)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING", logger="transresnet.train"):
        train(config, run, resume=True)
    assert any("is damaged" in r.message and newest.name in r.message for r in caplog.records)
    assert (run / "states" / f".damaged-{newest.name}").is_dir()
    assert_same_run(run, straight_run)


def test_resume_with_only_damaged_states_says_what_is_wrong(synthetic_data: Path, features: Path,
                                                            tmp_path: Path) -> None:
    from transresnet.checkpoint import CheckpointError

    run = tmp_path / "run"
    config = resume_config(synthetic_data, features, frozen=True, epochs=1)
    train(config, run)
    state_json = final_state(run) / "train_state.json"
    state_json.write_text(state_json.read_text()[:-20])
    with pytest.raises(CheckpointError, match=r"cannot resume in .*train_state.json is corrupted"):
        train(config, run, resume=True)


def test_resume_after_a_run_without_any_state(synthetic_data: Path, features: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "states").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=r"nothing to resume in .*run: it holds no training state"):
        train(resume_config(synthetic_data, features, frozen=True, epochs=1), run, resume=True)


def test_a_fresh_run_replaces_an_earlier_one(synthetic_data: Path, features: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(resume_config(synthetic_data, features, frozen=True, epochs=2), run)
    train(resume_config(synthetic_data, features, frozen=True, epochs=1), run)
    assert len(losses(run)) == 1
    assert [p.name for p in (run / "states").iterdir()] == [final_state(run).name]
    assert final_state(run).name.startswith("epoch-0001-")


# -------------------------------------------------------------------------------- kill -9 and resume

_KILLED_CHILD = '''
import os, signal, sys
from pathlib import Path

import transresnet.checkpoint as checkpoint
import transresnet.train as train_module
from transresnet.config import load_config

config_file, out, moment = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
calls = {"n": 0}


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if moment == "mid-state":  # epoch 2: optimizer tensors written, train_state.json and meta.json not yet
    real_save_file = train_module.save_file

    def save_file(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            die()

    train_module.save_file = save_file
elif moment in ("before-pointer", "best-between-renames"):
    real_replace = os.replace
    if moment == "best-between-renames":  # as where no atomic exchange exists
        checkpoint.exchange_dirs = lambda a, b: False

    def replace(src, dst, *args, **kwargs):
        name = Path(dst).name
        if moment == "before-pointer" and name == "LAST":
            calls["n"] += 1
            if calls["n"] == 2:  # epoch 2's state is renamed into states/, LAST still names epoch 1's
                die()
        real_replace(src, dst, *args, **kwargs)
        if moment == "best-between-renames" and name.startswith(".best.old-"):
            die()  # the old best/ moved aside, the new one not yet in place

    os.replace = replace
train_module.train(load_config(config_file), out)
print("FINISHED WITHOUT A KILL")
'''


@pytest.mark.parametrize("moment", ["mid-state", "before-pointer", "best-between-renames"])
def test_training_killed_at_a_dangerous_moment_resumes_exactly(synthetic_data: Path, features: Path,
                                                              straight_run: Path, tmp_path: Path,
                                                              moment: str) -> None:
    """SIGKILL in a child process while it writes epoch 2's state or best/; then --resume finishes the run
    exactly as the uninterrupted one did, with no leftovers."""
    import subprocess
    import sys

    from transresnet.checkpoint import load_checkpoint
    from transresnet.config import dump_config

    run = tmp_path / "run"
    config = resume_config(synthetic_data, features, frozen=True, epochs=3)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(dump_config(config))
    script = tmp_path / "child.py"
    script.write_text(_KILLED_CHILD)
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.run([sys.executable, str(script), str(config_file), str(run), moment], cwd=repo,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, (child.returncode, child.stdout, child.stderr[-3000:])
    if moment == "best-between-renames":
        assert not (run / "best").exists()  # the damage the resume must repair
    train(config, run, resume=True)
    assert_same_run(run, straight_run)
    assert load_checkpoint(run / "best").fingerprint
    assert_no_leftovers(run)


def test_hard_negatives_use_live_caption_vectors_once_the_transformer_trains(tiny_checkpoint) -> None:
    """After an until_plateau unfreeze the cached pooled outputs are stale: mining must not score with them
    (and a resumed run, which caches them from other weights, must mine the same negatives)."""
    from transresnet.train import Example, TextInputs, _CaptionPool

    model = tiny_checkpoint.model
    examples = [Example(image_row=i, trait=0, caption=f"caption number {i} of eight", query_key=i) for i in range(8)]
    pool = _CaptionPool(examples)
    texts = TextInputs(model)
    texts.precompute(pool.texts)
    texts.pooled = {t: torch.zeros_like(v) for t, v in texts.pooled.items()}  # stale: other weights
    texts.use_cache = False  # what Trainer._set_text_trainable(True) does
    queries = torch.randn(2, model.embed_dim, generator=torch.Generator().manual_seed(0))
    hard = pool.hardest(model, texts, queries, examples[:2], 3)
    with torch.inference_mode():
        live = (queries @ model.encode_text(pool.texts).T).max(dim=0).values.clone()
        live[:2] = float("-inf")
    assert hard == [pool.texts[i] for i in live.topk(3).indices.tolist()]
