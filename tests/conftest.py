"""Fixtures shared by every test: tiny random models, a caption index and the app, from local files only.

Plain helpers (image writers, config trees, servers) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a model hub: a stray hub name fails at once

import torch  # noqa: E402

from transresnet.runtime import apply_runtime_defaults  # noqa: E402

apply_runtime_defaults()
torch.set_num_threads(2)

from tests.helpers import ADMIN_TOKEN, TINY_TRAITS, build_test_index, tiny_tree  # noqa: E402
from transresnet.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from transresnet.config import ExperimentConfig, build_config  # noqa: E402
from transresnet.model import create_model  # noqa: E402
from transresnet.traits import TraitVocab  # noqa: E402


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer random BERT with MiniLM's real tokenizer, saved as a local folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from transresnet.encoders import resolve_text_model

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_config(tiny_text_model: Path) -> ExperimentConfig:
    return build_config(tiny_tree(tiny_text_model))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config: ExperimentConfig) -> Checkpoint:
    """A saved and reloaded random tiny checkpoint (traits: Sarcastic, Sweet, Angry, Cheerful)."""
    torch.manual_seed(0)
    model = create_model(tiny_config.model, TraitVocab(TINY_TRAITS))
    path = save_checkpoint(model, tiny_config, tmp_path_factory.mktemp("ckpt") / "best")
    return load_checkpoint(path)


@pytest.fixture(scope="session")
def service_index_root(tiny_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("service_index")
    build_test_index(tiny_checkpoint, root)
    return root


@pytest.fixture(scope="session")
def service_settings(tiny_checkpoint: Checkpoint, service_index_root: Path):
    from transresnet.service.settings import ServiceSettings

    return ServiceSettings(_env_file=None, checkpoint=tiny_checkpoint.path, index_root=service_index_root,
                           admin_token=ADMIN_TOKEN, max_upload_bytes=256 * 1024, max_pixels=2_000_000,
                           max_wait_ms=2.0, device="cpu")


@pytest.fixture(scope="module")
def service_client(service_settings) -> Iterator:
    from fastapi.testclient import TestClient
    from transresnet.service.main import create_app

    with TestClient(create_app(service_settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic personality-caption dataset (300 images at 32 px), drawn once per test run."""
    from transresnet.synth import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), 300, seed=1, image_size=32)


@pytest.fixture(scope="session")
def plain_checkpoint(tiny_text_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """A tiny checkpoint trained without personalities (like configs/flickr8k.yaml)."""
    config = build_config(tiny_tree(tiny_text_model, model={"personality": {"enabled": False}}))
    torch.manual_seed(0)
    model = create_model(config.model, TraitVocab([]))
    return load_checkpoint(save_checkpoint(model, config, tmp_path_factory.mktemp("plain") / "best"))


@pytest.fixture(scope="session")
def plain_settings(plain_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """Service settings serving ``plain_checkpoint`` with its own caption index."""
    from transresnet.service.settings import ServiceSettings

    root = tmp_path_factory.mktemp("plain_index")
    build_test_index(plain_checkpoint, root)
    return ServiceSettings(_env_file=None, checkpoint=plain_checkpoint.path, index_root=root, device="cpu")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator:
    """One local Ray instance (2 CPUs) for the whole run, quiet, no dashboard, its temp dir under /tmp (Ray's
    socket paths must stay short); skips where the distributed extra is not installed."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[distributed]'")
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install -e '.[distributed]'")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # tests never touch the network
    temp = tempfile.mkdtemp(prefix="ray-tests-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False, _temp_dir=temp,
             object_store_memory=256 << 20)  # the tests' blocks are small; leave /dev/shm to the rest of the run
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no per-dataset execution plans in test output
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Headless Debian Chromium through Selenium (no downloads); skips where it is not installed."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def tiny_generator_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny UpDown generator checkpoint taught the service captions in their voices (tests/helpers.py)."""
    from tests.helpers import torch_threads, train_tiny_generator

    with torch_threads(1):
        return train_tiny_generator(tmp_path_factory.mktemp("generator") / "best", steps=100)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the test (tiny generator models train faster so)."""
    from tests.helpers import torch_threads

    with torch_threads(1):
        yield
