"""The embedded demos: `transresnet serve [--demo synthetic|flickr8k] [--data DIR]` builds a pair once and reuses it.

The flickr8k recipe runs end to end on a tiny setup: a few generated photos in the readers' CSV layout, the
real voices step, training with config overrides that swap in a tiny backbone and text model, a real FAISS
index, a real server on loopback.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerThread, free_port, image_bytes, shared_path, write_image


def _serve_args(*argv: str, **flags) -> argparse.Namespace:
    from transresnet.cli.serve import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    argv = ["serve", *argv] + [item for key, value in flags.items()
                               for item in (f"--{key.replace('_', '-')}", str(value))]
    return parser.parse_args(argv)


def photo_folder(root: Path, train: int = 6, val: int = 3, seed: int = 0) -> Path:
    """A photo set in the readers' CSV layout: captions.csv (image,split,caption) and images/."""
    lines = ["image,split,caption"]
    for i in range(train + val):
        name, split = f"photo_{seed}_{i:02d}.jpg", "train" if i < train else "val"
        write_image(root / "images" / name, size=(48, 40), seed=seed * 100 + i)
        lines += [f"{name},{split},A dog number {i} runs on the beach .",
                  f"{name},{split},Photo {i} of a child on a red swing ."]
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root


def tiny_demo_overrides(text_model: Path) -> tuple[str, ...]:
    """A recipe's config with a tiny backbone (no weights file) and the tiny BERT, one short epoch."""
    image = {"backbone": "test_resnet", "image_size": 32, "resize_size": 32, "freeze_backbone": True}
    return (f"model.image={json.dumps(image)}", f"model.text.model={text_model}", "model.text.max_length=16",
            "model.hidden_dim=16", "train.epochs=1", "train.batch_size=20", "train.device=cpu",
            "train.hard_negatives=0")


@pytest.fixture(scope="module")
def tiny_overrides(tiny_text_model: Path) -> tuple[str, ...]:
    return tiny_demo_overrides(tiny_text_model)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return photo_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def flickr8k_demo(tmp_path_factory: pytest.TempPathFactory, photos: Path, tiny_overrides) -> dict:
    import transresnet.service.demo as demo

    demo_dir = tmp_path_factory.mktemp("demo")
    checkpoint, index_root = demo.ensure_demo(demo_dir, "flickr8k", data=photos, overrides=tiny_overrides)
    return {"demo_dir": demo_dir, "checkpoint": checkpoint, "index_root": index_root}


def test_flickr8k_demo_builds_and_answers_a_val_photo_end_to_end(flickr8k_demo, photos: Path) -> None:
    from transresnet.service.main import create_app
    from transresnet.service.settings import ServiceSettings

    settings = ServiceSettings(_env_file=None, checkpoint=flickr8k_demo["checkpoint"],
                               index_root=flickr8k_demo["index_root"], device="cpu")
    with ServerThread(create_app(settings), free_port()) as server, httpx.Client(base_url=server.base_url) as http:
        ready = http.get("/readyz").json()
        description = ready["model"]["description"]
        assert description.startswith("flickr8k_voices: Flickr8k photos of people, animals, outdoor scenes")
        assert "template voices, a proxy for Personality-Captions" in description
        assert "10 personalities" in description
        assert ready["index"]["size"] == 9 * 2 * 10  # every caption of every photo, in every voice

        samples = http.get("/v1/samples").json()["samples"]
        assert [s["name"] for s in samples] == ["photo_0_06.jpg", "photo_0_07.jpg", "photo_0_08.jpg"]  # val
        photo = http.get(samples[0]["url"]).content
        assert photo == (photos / "images" / "photo_0_06.jpg").read_bytes()

        answer = http.post("/v1/captions", files={"image": ("p.jpg", photo, "image/jpeg")},
                           data={"personality": ["Sarcastic", "Sweet"], "k": "3"})
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert [r["personality"] for r in results] == ["Sarcastic", "Sweet"]
        assert all(len(r["captions"]) == 3 for r in results)


def test_the_cache_is_reused_and_another_data_folder_builds_anew(flickr8k_demo, photos: Path, tiny_overrides,
                                                                 tmp_path: Path, monkeypatch) -> None:
    import transresnet.service.demo as demo

    demo_dir, pair = flickr8k_demo["demo_dir"], (flickr8k_demo["checkpoint"], flickr8k_demo["index_root"])
    real_build = demo.build_demo
    built: list[Path] = []
    monkeypatch.setattr(demo, "build_demo", lambda folder, *a: built.append(folder) or real_build(folder, *a))

    assert demo.ensure_demo(demo_dir, "flickr8k", data=photos, overrides=tiny_overrides) == pair
    assert built == []  # second start: the cache, no build

    other = photo_folder(tmp_path / "other", train=4, val=2, seed=1)
    checkpoint, index_root = demo.ensure_demo(demo_dir, "flickr8k", data=other, overrides=tiny_overrides)
    assert len(built) == 1 and checkpoint != pair[0] and index_root.is_relative_to(built[0])
    record = json.loads((built[0] / demo.MARKER).read_text())
    assert record["demo"] == "flickr8k" and record["data"] == str(other) and record["seconds"] > 0
    # Both caches stay: going back to the first folder reuses it.
    assert demo.ensure_demo(demo_dir, "flickr8k", data=photos, overrides=tiny_overrides) == pair
    assert len(built) == 1


def test_the_cache_key_follows_the_data_and_the_config(photos: Path, tmp_path: Path, tiny_overrides) -> None:
    import transresnet.service.demo as demo
    from transresnet.service.demo import demo_folder

    request = dict(data=photos, overrides=tiny_overrides)
    first = demo_folder(tmp_path, "flickr8k", demo.DemoRequest(**request))
    assert first == demo_folder(tmp_path, "flickr8k", demo.DemoRequest(**request))
    assert first.name.startswith("flickr8k-")
    edited = photo_folder(tmp_path / "edited")
    same_path = demo.DemoRequest(data=edited, overrides=tiny_overrides)
    before = demo_folder(tmp_path, "flickr8k", same_path)
    (edited / "captions.csv").write_text((edited / "captions.csv").read_text().replace("dog", "cat"))
    assert demo_folder(tmp_path, "flickr8k", same_path) != before  # same folder, other captions
    longer = demo.DemoRequest(data=photos, overrides=(*tiny_overrides, "train.epochs=2"))
    assert demo_folder(tmp_path, "flickr8k", longer) != first
    assert demo_folder(tmp_path, "synthetic") != demo_folder(tmp_path, "synthetic", demo.DemoRequest(num_images=99))


def _flickr8k_from(monkeypatch, base_url: str) -> None:
    """Point `transresnet data download flickr8k` at a mirror (the same archive names)."""
    import transresnet.download as download

    source = download.DATASETS["flickr8k"]
    monkeypatch.setitem(download.DATASETS, "flickr8k", download.DatasetSource(
        source.name, {key: download.Remote(f"{base_url}/{remote.name}") for key, remote in source.archives.items()},
        description=source.description))


def test_without_data_flickr8k_is_downloaded_once_and_trained_on(tmp_path: Path, monkeypatch, tiny_overrides,
                                                                 caplog) -> None:
    """No --data: Flickr8k's two archives from a loopback mirror (its train, dev and test lists), laid out by
    the downloader, cut to the demo's train and val photos, voiced, trained on and indexed."""
    import transresnet.service.demo as demo

    from tests.test_download import _flickr8k_archives, _Server

    (tmp_path / "www").mkdir()
    with _Server(tmp_path / "www") as mirror:
        _flickr8k_archives(mirror.root)
        _flickr8k_from(monkeypatch, mirror.url)
        with caplog.at_level(logging.INFO):
            checkpoint, index_root = demo.ensure_demo(tmp_path / "demo", "flickr8k", overrides=tiny_overrides)
        assert "downloading Flickr8k" in caplog.text and "about 1.1 GB" in caplog.text
        assert len(mirror.requests) == 2
        # A second start neither downloads nor builds.
        assert demo.ensure_demo(tmp_path / "demo", "flickr8k", overrides=tiny_overrides) == (checkpoint, index_root)
        assert len(mirror.requests) == 2
    assert (tmp_path / "demo" / "flickr8k-data" / "captions.csv").is_file()
    voiced = demo._read_rows(index_root.parent / "voices" / "captions.csv")
    assert {r["split"] for r in voiced} == {"train", "val"} and len({r["image"] for r in voiced}) == 8


def test_offline_without_data_is_one_line_naming_the_flag(tmp_path: Path, monkeypatch, caplog) -> None:
    from transresnet.cli import main

    _flickr8k_from(monkeypatch, f"http://127.0.0.1:{free_port()}")  # nothing listens: as on a machine offline
    demo_dir = tmp_path / "demo"
    with caplog.at_level(logging.INFO):
        assert main(["serve", "--demo", "flickr8k", "--demo-dir", str(demo_dir), "--port", str(free_port())]) == 2
    assert "about 1.1 GB" in caplog.text  # said before it tries
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in caplog.text
    assert "could not download Flickr8k" in errors[0] and "pass --data DIR" in errors[0]
    assert not (demo_dir / "flickr8k-data").exists()


def test_a_data_folder_not_in_the_csv_layout_is_one_line(tmp_path: Path, caplog) -> None:
    from transresnet.cli import main

    (tmp_path / "loose").mkdir()
    write_image(tmp_path / "loose" / "a.jpg")
    assert main(["serve", "--demo", "flickr8k", "--data", str(tmp_path / "loose"), "--demo-dir",
                 str(tmp_path / "demo"), "--port", str(free_port())]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "needs captions.csv" in errors[0] and "images/" in errors[0]


def test_missing_backbone_weights_are_one_line_before_any_work(photos: Path, tiny_overrides, tmp_path: Path) -> None:
    import transresnet.service.demo as demo

    missing = tmp_path / "tf_efficientnet_lite2_imagenet.safetensors"
    with pytest.raises(demo.DemoDataError, match=f"weights {missing} are not on this machine"):
        demo.ensure_demo(tmp_path / "demo", "flickr8k", data=photos,
                         overrides=(*tiny_overrides, f"model.image.weights={missing}"))
    [folder] = (tmp_path / "demo").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no voices, no training, no marker


def test_a_large_photo_set_is_cut_to_the_demo_size(tmp_path: Path, monkeypatch) -> None:
    import transresnet.service.demo as demo

    source = photo_folder(tmp_path / "big", train=5, val=3) / "captions.csv"
    with source.open("a") as handle:
        handle.write("photo_0_00.jpg,test,A test caption .\n")
    monkeypatch.setattr(demo, "FLICKR8K_TRAIN_PHOTOS", 2)
    monkeypatch.setattr(demo, "FLICKR8K_VAL_PHOTOS", 1)
    subset = demo._demo_subset(source, tmp_path / "subset")
    rows = demo._read_rows(subset)
    assert sorted({(r["image"], r["split"]) for r in rows}) == [
        ("photo_0_00.jpg", "train"), ("photo_0_01.jpg", "train"), ("photo_0_05.jpg", "val")]
    assert len(rows) == 6
    small = photo_folder(tmp_path / "small", train=2, val=1) / "captions.csv"
    assert demo._demo_subset(small, tmp_path / "unused") == small  # read in place, nothing written
    assert not (tmp_path / "unused").exists()


def test_serve_picks_the_demo_from_its_flags(monkeypatch, tiny_checkpoint, service_index_root, tmp_path,
                                             caplog) -> None:
    import transresnet.service.demo
    import uvicorn

    from transresnet.cli.serve import _serve

    for name in ("TRANSRESNET_CHECKPOINT", "TRANSRESNET_INDEX_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    asked: list[tuple] = []

    def ensure(folder, name, **kwargs):
        asked.append((folder, name, kwargs.get("data")))
        return tiny_checkpoint.path, service_index_root

    monkeypatch.setattr(transresnet.service.demo, "ensure_demo", ensure)
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    with caplog.at_level(logging.INFO):
        assert _serve(_serve_args(port=8123)) == 0
        assert _serve(_serve_args("--demo", "flickr8k", data=tmp_path)) == 0
        assert _serve(_serve_args(data=tmp_path)) == 0  # --data alone means the real-photo demo
    assert asked == [(Path(".cache/demo"), "synthetic", None), (Path(".cache/demo"), "flickr8k", tmp_path),
                     (Path(".cache/demo"), "flickr8k", tmp_path)]
    assert served["host"] == "127.0.0.1"
    settings = served["app"].state.settings
    assert settings.checkpoint == tiny_checkpoint.path and settings.index_root == service_index_root
    assert "http://127.0.0.1:8000/" in caplog.text and "curl -F image=@" in caplog.text
    with pytest.raises(ValueError, match="synthetic demo draws its own"):
        _serve(_serve_args("--demo", "synthetic", data=tmp_path))
    with pytest.raises(ValueError, match="without --checkpoint"):
        _serve(_serve_args("--demo", "flickr8k", checkpoint=tiny_checkpoint.path, index=service_index_root))


def test_serve_refuses_half_configuration(monkeypatch, tmp_path):
    from transresnet.cli.serve import _serve

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRANSRESNET_INDEX_ROOT", raising=False)
    with pytest.raises(ValueError, match="both"):
        _serve(_serve_args(checkpoint=tmp_path))
    with pytest.raises(FileNotFoundError, match="transresnet train"):
        _serve(_serve_args(checkpoint=tmp_path / "missing", index=tmp_path))


def test_cached_demo_is_reused(monkeypatch, tmp_path, tiny_checkpoint, service_index_root):
    import transresnet.service.demo as demo

    folder = demo.demo_folder(tmp_path, "synthetic")
    folder.mkdir()
    (folder / demo.MARKER).write_text(json.dumps({"checkpoint": str(tiny_checkpoint.path),
                                                  "index_root": str(service_index_root)}))
    monkeypatch.setattr(demo, "build_demo", lambda *a, **k: pytest.fail("the cached demo was rebuilt"))
    assert demo.ensure_demo(tmp_path) == (tiny_checkpoint.path, service_index_root)


def test_the_description_says_what_photos_the_model_knows(tiny_text_model: Path, tmp_path: Path,
                                                          tiny_checkpoint) -> None:
    import torch
    from transresnet.service.bundle import describe_model

    from tests.helpers import tiny_tree
    from transresnet.checkpoint import load_checkpoint, save_checkpoint
    from transresnet.config import build_config
    from transresnet.model import create_model
    from transresnet.traits import TraitVocab

    config = build_config(tiny_tree(tiny_text_model, data={"train": "data/captions.csv"}), ["name=synthetic"])
    torch.manual_seed(0)
    checkpoint = load_checkpoint(save_checkpoint(create_model(config.model, TraitVocab(["Sweet"])), config,
                                                 tmp_path / "best"))
    assert describe_model(checkpoint) == ("synthetic: synthetic drawn shapes: send coloured shapes, not photos; "
                                          "test_resnet image encoder, trained on captions.csv in data/, "
                                          "1 personalities")
    assert describe_model(tiny_checkpoint).startswith("tiny: test_resnet image encoder")  # unknown data: no claim


@pytest.mark.slow
def test_synthetic_demo_builds_once_and_serves(tmp_path, monkeypatch):
    """The real pipeline (synthetic data -> train configs/synthetic.yaml -> index), kept small."""
    import transresnet.service.demo as demo
    from fastapi.testclient import TestClient
    from transresnet.service.main import create_app
    from transresnet.service.settings import ServiceSettings

    small = {"num_images": 150, "overrides": ["train.epochs=1", "train.batch_size=50"]}
    checkpoint, index_root = demo.ensure_demo(tmp_path / "demo", **small)
    monkeypatch.setattr(demo, "build_demo", lambda *a, **k: pytest.fail("the cached demo was rebuilt"))
    assert demo.ensure_demo(tmp_path / "demo", **small) == (checkpoint, index_root)

    settings = ServiceSettings(_env_file=None, checkpoint=checkpoint, index_root=index_root)
    with TestClient(create_app(settings)) as client:
        names = [p["name"] for p in client.get("/v1/personalities").json()["personalities"]]
        assert "Sarcastic" in names
        assert "send coloured shapes, not photos" in client.get("/readyz").json()["model"]["description"]
        response = client.post("/v1/captions", files={"image": ("a.jpg", image_bytes(size=(64, 64)), "image/jpeg")},
                               data={"personality": ["Sarcastic", "Sweet"], "k": "3"})
        assert response.status_code == 200, response.text
        assert [len(r["captions"]) for r in response.json()["results"]] == [3, 3]


def _shared_subset(folder: Path, train: int, val: int) -> Path:
    """A readers'-layout folder of the first ``train`` and ``val`` photos of ../shared's Flickr8k set: its
    caption rows, and the photos linked (never copied) from ../shared."""
    source = shared_path("data", "flickr8k-1k")
    rows = (source / "captions.csv").read_text().splitlines()
    keep: dict[str, list[str]] = {"train": [], "val": []}
    for row in rows[1:]:
        image, split = row.split(",")[:2]
        if split in keep and image not in keep[split] and len(keep[split]) < {"train": train, "val": val}[split]:
            keep[split].append(image)
    chosen = set(keep["train"] + keep["val"])
    (folder / "images").mkdir(parents=True)
    for image in chosen:
        (folder / "images" / image).symlink_to(source / "images" / image)
    lines = [rows[0]] + [row for row in rows[1:] if row.split(",")[0] in chosen]
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.slow
@pytest.mark.shared
def test_the_real_flickr8k_demo_from_shared(tmp_path: Path) -> None:
    """The real recipe (voices, EfficientNet-Lite2 and MiniLM from ../shared, training, the voiced index) on
    60 of ../shared's Flickr8k photos, two epochs: the whole path a user's --data takes, in minutes. (The full
    800-photo demo build took 45 minutes on 2 busy cores; README.)"""
    import transresnet.service.demo as demo
    from fastapi.testclient import TestClient
    from transresnet.service.main import create_app
    from transresnet.service.settings import ServiceSettings

    from transresnet.voices import VOICES

    data = _shared_subset(tmp_path / "data", train=50, val=10)
    checkpoint, index_root = demo.ensure_demo(tmp_path / "demo", "flickr8k", data=data,
                                              overrides=["train.epochs=2"])
    settings = ServiceSettings(_env_file=None, checkpoint=checkpoint, index_root=index_root, device="cpu")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()
        assert "Flickr8k photos" in ready["model"]["description"]
        assert "tf_efficientnet_lite2 image encoder" in ready["model"]["description"]
        assert 0.99 * 60 * 5 * len(VOICES) <= ready["index"]["size"] <= 60 * 5 * len(VOICES)  # a few duplicates
        samples = client.get("/v1/samples").json()["samples"]
        val = {line.split(",")[0] for line in (data / "captions.csv").read_text().splitlines() if ",val," in line}
        assert len(samples) == 8 and {s["name"] for s in samples} <= val
        photo = client.get(samples[0]["url"]).content
        answer = client.post("/v1/captions", files={"image": ("p.jpg", photo, "image/jpeg")},
                             data={"personality": ["Sarcastic"], "k": "5"})
        assert answer.status_code == 200, answer.text
        captions = answer.json()["results"][0]["captions"]
        assert len(captions) == 5 and {c["metadata"]["personality"] for c in captions} <= set(VOICES)
