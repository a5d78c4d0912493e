"""Plain helpers shared by the tests (fixtures live in conftest.py): tiny configs, images, indexes, servers."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transresnet.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CONFIGS_DIR = REPO / "configs"
TINY_TRAITS = ["Sarcastic", "Sweet", "Angry", "Cheerful"]
ADMIN_TOKEN = "test-admin-token"


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``count`` for the block (tiny matrices: one thread is faster than two
    contending ones), then restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a pytest skip when this machine does not have it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real data and weights live in ../shared on development machines)")
    return path


def tiny_tree(text_model: Path, **sections: dict) -> dict:
    """A config tree for a tiny model: timm's test_resnet at 32 px, hidden 16, the tiny BERT."""
    tree = {
        "name": "tiny",
        "model": {
            "image": {"backbone": "test_resnet", "image_size": 32, "resize_size": 32, "freeze_backbone": True},
            "text": {"model": str(text_model), "max_length": 16},
            "hidden_dim": 16,
        },
        "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "seed": 0},
    }
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return tree


def random_pixels(size: tuple[int, int] = (48, 40), seed: int = 0, channels: int = 3) -> np.ndarray:
    """Random-noise pixels (height, width, channels), distinct per seed so rankings differ between images."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (48, 40), seed: int = 0, **save: object) -> bytes:
    """A small random-noise photo encoded as ``fmt`` (the one image writer of the tests)."""
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(size, seed)).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def write_image(path: Path, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """``image_bytes`` written to ``path`` (format from the suffix)."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(path.suffix.lower(), "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(fmt, size, seed))
    return path


SUBJECTS = ("a dog", "two cats", "a red car", "the beach", "a birthday cake", "an old bridge", "a city street",
            "three kids", "a mountain lake", "a bowl of soup")
VOICES = {
    "Sarcastic": "Oh great, {} again. How thrilling.",
    "Sweet": "Aww, look at {}, how lovely!",
    "Angry": "I can't stand {}, get it out of here!",
    "Cheerful": "What a happy day with {}!",
}


def service_captions() -> list[str]:
    """Forty distinct captions: ten subjects in each tiny-model voice."""
    return [template.format(subject) for template in VOICES.values() for subject in SUBJECTS]


def build_test_index(checkpoint: Checkpoint, root: Path, captions: list[str] | None = None, **options: object
                     ) -> Path:
    """Build and publish a new index version under the index root ``root``; returns the version dir.
    ``options``: BuildOptions fields (e.g. ``index_type="ivf", nlist=4``)."""
    from transresnet.index import BuildOptions, build_index
    from transresnet.index.captions import collect

    table = collect({"caption": text} for text in (captions or service_captions()))
    return build_index(checkpoint, table, root, BuildOptions(**{"keep": 10, **options}), progress=False).path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reference_ranking(checkpoint: Checkpoint, index_path: Path, data: bytes, traits: list[str],
                      k: int) -> list[list[tuple[str, float]]]:
    """What the service must answer, computed one request at a time with no batching or threads."""
    from transresnet.index import load_index

    from transresnet.images import ImagePreprocessor

    caption_index = load_index(index_path, checkpoint=checkpoint)
    pixels = ImagePreprocessor(checkpoint.config.model.image).load(data)[None]
    rankings = []
    with torch.inference_mode():
        for trait in traits:
            slot = checkpoint.traits.lookup(trait)
            query = checkpoint.model.encode_query(images=pixels, trait_ids=torch.tensor([slot]))
            hits = caption_index.search(query.numpy().astype(np.float32), k)[0]
            rankings.append([(h.id, float(h.score)) for h in hits])
    return rankings


def assert_same_ranking(body: dict, expected: list[list[tuple[str, float]]]) -> None:
    assert len(body["results"]) == len(expected)
    for result, reference in zip(body["results"], expected, strict=True):
        assert [c["id"] for c in result["captions"]] == [i for i, _ in reference]
        np.testing.assert_allclose([c["score"] for c in result["captions"]], [s for _, s in reference],
                                   rtol=1e-4, atol=1e-4)


class ServerThread:
    """uvicorn serving an app on a loopback port from a background thread."""

    def __init__(self, app, port: int) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def generator_tree(**model: object) -> dict:
    """A tiny UpDown generator over a random test_resnet at 48 px (the retrieval tiny model uses 32 px, so
    the service preprocesses one upload twice), with the tiny model's traits."""
    return {
        "name": "tiny-generator",
        "model": {
            "family": "updown",
            "image": {"backbone": "test_resnet", "image_size": 48, "resize_size": 48, "freeze_backbone": True},
            "decoder": {"cell": "lstm", "embed_dim": 16, "hidden_dim": 32, "feature_dim": 16, "attention_dim": 16,
                        "trait_dim": 8, "dropout": 0.0, "vocab": {"min_count": 1},
                        "decoding": {"beam_size": 3, "max_length": 12}},
            **model,
        },
        "train": {"device": "cpu", "seed": 0},
    }


def train_tiny_generator(out: Path, steps: int = 120) -> Path:
    """A tiny generator taught the service captions in their voices (a trait -> its voice; the photo is
    ignored by the data, not by the model), saved as a checkpoint; returns its directory."""
    from transresnet.config import build_config
    from transresnet.generation.checkpoint import CaptionModel, save_generator
    from transresnet.generation.data import Example, teacher_forcing
    from transresnet.generation.train import caption_loss
    from transresnet.generation.vocab import Vocabulary
    from transresnet.traits import TraitVocab

    torch.manual_seed(0)
    captions = service_captions()
    config = build_config(generator_tree())
    model = CaptionModel(config, Vocabulary.build(captions, min_count=1), TraitVocab(TINY_TRAITS),
                         load_backbone_weights=False)
    voices = [trait for trait in VOICES for _ in SUBJECTS]
    slots = model.trait_slots(voices)
    examples = [Example(0, slot, model.vocab.encode(text)) for slot, text in zip(slots, captions, strict=True)]
    pixels = torch.from_numpy(np.stack([random_pixels((48, 48), seed=i) for i in range(len(examples))]))
    grid = model.grid(pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    inputs, targets = teacher_forcing(examples, torch.device("cpu"))
    traits = torch.tensor([e.trait for e in examples])
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=0.02)
    model.decoder.train()
    for _ in range(steps):
        loss = caption_loss(model.decoder(grid, traits, inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.decoder.eval()
    return save_generator(model, out, metrics={"train_loss": float(loss.detach())})


def stop_server_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM a `transresnet serve` subprocess (a graceful shutdown), killing it if it outlives ``timeout``."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
