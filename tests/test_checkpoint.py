"""Checkpoints: damaged ones fail with messages that name the file and the fix; publishing is atomic; no hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from transresnet import checkpoint as ckpt
from transresnet import files
from transresnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tiny_checkpoint, tmp_path: Path) -> Path:
    return save_checkpoint(tiny_checkpoint.model, tiny_checkpoint.config, tmp_path / "ck")


def _edit_meta(path: Path, edit) -> None:
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


# ------------------------------------------------------------------------------------ damaged files


def test_flipped_byte_in_the_weights_is_a_checksum_error(saved: Path) -> None:
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupted.*retrain"):
        load_checkpoint(saved)


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_weights_name_the_file_and_the_fix(saved: Path, verify: bool) -> None:
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    expected = "is corrupted" if verify else "cannot be read .*truncated or damaged"
    with pytest.raises(CheckpointError, match=expected) as err:
        load_checkpoint(saved, verify=verify)
    assert str(weights) in str(err.value) and "retrain" in str(err.value)


@pytest.mark.parametrize("key", ["fingerprint", "files", "format_version", "embed_dim"])
def test_meta_without_an_expected_entry(saved: Path, key: str) -> None:
    _edit_meta(saved, lambda meta: meta.pop(key))
    with pytest.raises(CheckpointError, match=f"meta.json has no '{key}' entry") as err:
        load_checkpoint(saved)
    assert str(saved / "meta.json") in str(err.value)


def test_meta_without_the_checksum_of_the_weights(saved: Path) -> None:
    _edit_meta(saved, lambda meta: meta["files"].pop("model.safetensors"))
    with pytest.raises(CheckpointError, match="lists no checksum for model.safetensors"):
        load_checkpoint(saved)


def test_meta_that_is_not_json(saved: Path) -> None:
    (saved / "meta.json").write_text('{"format_version": 1, "finger')
    with pytest.raises(CheckpointError, match="meta.json is corrupted"):
        load_checkpoint(saved)


def test_weights_that_do_not_fit_the_config_name_the_tensors(saved: Path) -> None:
    config_file = saved / "config.yaml"
    config_file.write_text(config_file.read_text().replace("hidden_dim: 16", "hidden_dim: 24"))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(saved, verify=False)
    message = str(err.value)
    assert "model.safetensors do not fit the model its" in message and "config.yaml" in message
    assert "image_mlp.layers.2.weight [16, 96] where the config builds [24, 96]" in message
    assert "Error(s) in loading" not in message and "retrain" in message


def test_weights_missing_a_tensor(saved: Path, tiny_checkpoint) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / "model.safetensors"))
    state.pop("logit_scale")
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match="1 missing: logit_scale"):
        load_checkpoint(saved, verify=False)


def test_config_that_no_longer_validates(saved: Path) -> None:
    config_file = saved / "config.yaml"
    config_file.write_text(config_file.read_text().replace("hidden_dim: 16", "hidden_dim: many"))
    with pytest.raises(CheckpointError, match=r"config.yaml is not a valid config \(model.hidden_dim"):
        load_checkpoint(saved, verify=False)


def test_missing_text_folder_is_a_checkpoint_error(saved: Path) -> None:
    import shutil

    shutil.rmtree(saved / "text")
    with pytest.raises(CheckpointError, match=r"has no text/ folder .*nothing is fetched from a model hub"):
        load_checkpoint(saved, verify=False)


_NO_HUB_CHILD = textwrap.dedent('''
    import socket, sys, time
    import huggingface_hub, huggingface_hub.file_download, transformers.utils.hub

    def no_network(*args, **kwargs):
        print("NETWORK", args[:2], flush=True)
        raise AssertionError("tried the network")

    socket.socket.connect = no_network
    socket.create_connection = no_network
    for module in (huggingface_hub, huggingface_hub.file_download, transformers.utils.hub):
        for name in ("hf_hub_download", "snapshot_download", "model_info"):
            if hasattr(module, name):
                setattr(module, name, no_network)
    from transresnet.checkpoint import CheckpointError, load_checkpoint

    start = time.perf_counter()
    try:
        load_checkpoint(sys.argv[1], verify=False)
    except CheckpointError as err:
        print(f"CHECKPOINT_ERROR {time.perf_counter() - start:.2f} {err}", flush=True)
''')


def test_missing_text_folder_never_tries_the_hub_even_online(saved: Path, tmp_path: Path) -> None:
    """With HF_HUB_OFFLINE unset, the missing text/ answers at once, with no download attempt or connection."""
    import shutil

    shutil.rmtree(saved / "text")
    script = tmp_path / "child.py"
    script.write_text(_NO_HUB_CHILD)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, str(script), str(saved)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert "NETWORK" not in done.stdout, done.stdout
    assert "CHECKPOINT_ERROR" in done.stdout, (done.stdout, done.stderr[-2000:])
    seconds = float(done.stdout.split("CHECKPOINT_ERROR ", 1)[1].split()[0])
    assert seconds < 5, f"took {seconds}s: retried something"
    assert "has no text/ folder" in done.stdout


def test_text_assets_load_with_local_files_only(tiny_checkpoint, monkeypatch) -> None:
    """Loading from a checkpoint's text/ folder passes local_files_only to every from_pretrained."""
    import transformers

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig):
        original = cls.from_pretrained.__func__

        def spy(klass, source, *args, _original=original, **kwargs):
            seen.append(kwargs.get("local_files_only"))
            return _original(klass, source, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_checkpoint(tiny_checkpoint.path)
    assert seen and all(seen), seen


# ------------------------------------------------------------------------------------- publishing


def test_saving_over_a_checkpoint_leaves_one_complete_directory(tiny_checkpoint, tmp_path: Path) -> None:
    target = tmp_path / "best"
    save_checkpoint(tiny_checkpoint.model, tiny_checkpoint.config, target, metrics={"epoch": 1})
    save_checkpoint(tiny_checkpoint.model, tiny_checkpoint.config, target, metrics={"epoch": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    assert load_checkpoint(target).meta["metrics"] == {"epoch": 2}


def test_publishing_never_leaves_the_target_missing(tiny_checkpoint, tmp_path: Path, monkeypatch) -> None:
    """Readers polling during 2 swaps always find a complete checkpoint (atomic exchange)."""
    target = tmp_path / "best"
    save_checkpoint(tiny_checkpoint.model, tiny_checkpoint.config, target)
    seen_missing = []
    original = ckpt.exchange_dirs

    def watching(a: Path, b: Path) -> bool:
        swapped = original(a, b)
        seen_missing.append(not (b / "meta.json").is_file())
        return swapped

    monkeypatch.setattr(ckpt, "exchange_dirs", watching)
    save_checkpoint(tiny_checkpoint.model, tiny_checkpoint.config, target)
    assert seen_missing == [False]


def test_swap_cut_between_two_renames_is_recovered(tiny_checkpoint, tmp_path: Path, monkeypatch) -> None:
    """Where no atomic exchange exists, a kill between the two renames is undone on the next save."""
    target = tmp_path / "best"
    save_checkpoint(tiny_checkpoint.model, tiny_checkpoint.config, target, metrics={"epoch": 1})
    monkeypatch.setattr(ckpt, "exchange_dirs", lambda a, b: False)
    real_replace = os.replace

    def killed_after_first_rename(src, dst):
        real_replace(src, dst)
        if Path(dst).name.startswith(".best.old-"):
            raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(ckpt.os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_checkpoint.model, tiny_checkpoint.config, target, metrics={"epoch": 2})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not target.exists()
    ckpt.clean_leftovers(target)
    assert load_checkpoint(target).meta["metrics"] == {"epoch": 1}


def test_stale_leftovers_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    host = files.owner_tag().split("@")[1]
    stale = tmp_path / f".best.staging-1@{host}@{dead_pid}"
    stale.mkdir()
    mine = tmp_path / f".best.staging-2{files.owner_tag()}"
    mine.mkdir()
    other_host = tmp_path / f".best.staging-3@elsewhere@{dead_pid}"
    other_host.mkdir()
    assert files.remove_stale(tmp_path, ".best.") == [stale]
    assert not stale.exists() and mine.exists() and other_host.exists()


def test_write_text_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    pointer = tmp_path / "LAST"
    files.write_text_atomic(pointer, "one\n")
    files.write_text_atomic(pointer, "two\n")
    assert pointer.read_text() == "two\n" and [p.name for p in tmp_path.iterdir()] == ["LAST"]
