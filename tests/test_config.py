from pathlib import Path

import pytest

from transresnet.config import ConfigError, build_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_validate(path: Path) -> None:
    config = load_config(path)
    assert config.model.hidden_dim > 0


def test_overrides_apply_and_parse_types() -> None:
    config = build_config({}, ["train.lr=1e-3", "model.combine=concat", "model.image.mean=[0.5, 0.5, 0.5]"])
    assert config.train.lr == 0.001
    assert config.model.combine == "concat"
    assert config.model.image.mean == (0.5, 0.5, 0.5)


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="model.hiden_dim"):
        build_config({}, ["model.hiden_dim=3"])


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match="train.epochs"):
        build_config({"train": {"epochs": "many"}})


def test_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key.path=value"):
        build_config({}, ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
