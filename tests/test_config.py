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


@pytest.mark.parametrize("kwargs", [{"checkpoint_path": "/tmp/weights.pth"},
                                    {"pretrained_cfg_overlay": {"file": "/tmp/weights.safetensors"}},
                                    {"pretrained_cfg": {"url": "https://example.invalid/w.pth"}},
                                    {"pad_type": "same", "cache_dir": "/tmp/hub"}])
def test_backbone_kwargs_may_not_carry_weight_files(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=r"model.image.backbone_kwargs: .*may not be set in backbone_kwargs.*"
                                          r"model.image.weights"):
        build_config({"model": {"image": {"backbone_kwargs": kwargs}}})


def test_ordinary_backbone_kwargs_pass() -> None:
    config = build_config({"model": {"image": {"backbone_kwargs": {"pad_type": "same", "drop_rate": 0.1}}}})
    assert config.model.image.backbone_kwargs == {"pad_type": "same", "drop_rate": 0.1}


def test_backbone_kwargs_are_checked_on_assignment_too() -> None:
    config = build_config({})
    with pytest.raises(ValueError, match="checkpoint_path may not be set"):
        config.model.image.backbone_kwargs = {"checkpoint_path": "w.pth"}


def test_a_typo_in_a_key_names_the_closest_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({}, ["train.epoch=3", "model.image.dropuot=0.1", "data.zzz=1"])
    message = str(err.value)
    assert "train.epoch: Extra inputs are not permitted (did you mean train.epochs?)" in message
    assert "(did you mean model.image.dropout?)" in message
    assert "data.zzz: Extra inputs are not permitted\n" in message + "\n"  # nothing close: no guess
