"""The Dockerfile, checked without a Docker engine: paths, user, healthcheck, ports, one CUDA version."""

from __future__ import annotations

import re
import shlex

import pytest
from dockerfile_parse import DockerfileParser

from tests.helpers import REPO

STAGES = ("cpu", "gpu")


def _stages() -> dict[str, list[dict]]:
    """Instructions per build stage, by the stage's ``AS`` name."""
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    stages: dict[str, list[dict]] = {}
    current: list[dict] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            name = instruction["value"].split()[-1]
            current = stages.setdefault(name, [])
        current.append(instruction)
    return stages


def _values(stage: list[dict], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def _env(stage: list[dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in _values(stage, "ENV"):
        for part in shlex.split(value.replace("\\\n", " ")):
            key, _, val = part.partition("=")
            env[key] = val
    return env


@pytest.fixture(scope="module")
def stages() -> dict[str, list[dict]]:
    found = _stages()
    assert set(STAGES) <= set(found), f"Dockerfile stages: {sorted(found)}"
    return found


@pytest.mark.parametrize("name", STAGES)
def test_copied_paths_exist_and_the_image_runs_as_a_user(stages: dict[str, list[dict]], name: str) -> None:
    stage = stages[name]
    for value in _values(stage, "COPY"):
        *sources, _ = value.split()
        for source in sources:
            assert (REPO / source).exists(), f"{name}: COPY {source} does not exist in the repository"
    users = _values(stage, "USER")
    assert users and users[-1] not in ("root", "0"), f"{name} stage must not run as root"


@pytest.mark.parametrize("name", STAGES)
def test_healthcheck_port_and_volumes_agree(stages: dict[str, list[dict]], name: str) -> None:
    stage = stages[name]
    env = _env(stage)
    (healthcheck,) = _values(stage, "HEALTHCHECK")
    assert "/healthz" in healthcheck and "TRANSRESNET_PORT" in healthcheck
    assert _values(stage, "EXPOSE") == [env["TRANSRESNET_PORT"]]
    assert env["TRANSRESNET_HOST"] == "0.0.0.0" and env["HF_HUB_OFFLINE"] == "1"
    volumes = set(re.findall(r'"(/[^"]+)"', _values(stage, "VOLUME")[0]))
    cmd = _values(stage, "CMD")[0]
    assert '"--checkpoint", "/models/checkpoint"' in cmd and '"--index", "/index"' in cmd
    assert volumes == {"/models", "/index"}
    assert _values(stage, "ENTRYPOINT") == ['["transresnet", "serve"]']


def test_the_readme_mounts_what_the_image_reads() -> None:
    readme = (REPO / "README.md").read_text()
    assert ":/models/checkpoint:ro" in readme and ":/index:ro" in readme
    assert "--target cpu" in readme


def test_one_cuda_major_version_in_the_gpu_image(stages: dict[str, list[dict]]) -> None:
    gpu = stages["gpu"]
    base = re.search(r"nvidia/cuda:(\d+)\.(\d+)", gpu[0]["value"])
    assert base, "the gpu stage builds on an nvidia/cuda image"
    runs = " ".join(_values(gpu, "RUN"))
    torch_cuda = re.search(r"download\.pytorch\.org/whl/cu(\d+)", runs)
    faiss_cuda = re.search(r"faiss-gpu-cu(\d+)", runs)
    assert torch_cuda and faiss_cuda
    major = base.group(1)
    assert torch_cuda.group(1).startswith(major) and faiss_cuda.group(1) == major
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f"faiss-gpu-cu{major}" in pyproject  # the gpu extra installs the same build


def test_the_cpu_image_installs_the_cpu_torch_build(stages: dict[str, list[dict]]) -> None:
    runs = " ".join(_values(stages["cpu"], "RUN"))
    assert "download.pytorch.org/whl/cpu" in runs and "nvidia" not in stages["cpu"][0]["value"]
