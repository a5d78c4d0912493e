"""Typed configuration for every part of a TransResNet setup.

One pydantic model per part; whole setups live as YAML files in ``configs/``. Unknown keys and wrong
types are errors that name the offending key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from transresnet.options import Device, ImageTTA

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm.create_model arguments that load weights or read files: weights come only through `weights`.
REFUSED_BACKBONE_KWARGS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                                     "cache_dir", "model_name", "file", "url", "hf_hub_id"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ImageEncoderConfig(_Strict):
    backbone: str = "mobilenetv2_100"
    """timm model name of the CNN backbone (its global-pooled features are the image features)."""
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. ``pad_type: same``)."""
    weights: str | None = None
    """Local weights file (.safetensors, or a torch file loaded with ``weights_only``); None = no file."""
    pretrained: bool = False
    """Use timm's own pretrained-weights mechanism (needs a network or a warm hub cache)."""
    image_size: int = Field(224, ge=16)
    """Side of the square centre crop fed to the backbone."""
    resize_size: int | None = Field(None, ge=16)
    """Short side the image is resized to before cropping; None = image_size * 256 / 224."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    """Resampling of the resize (and of training crops): the one the backbone's weights were trained with."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    tta: ImageTTA = "none"
    """Test-time augmentation: the views of each photo whose pooled features are averaged before the image MLP
    in evaluation, the service and the Python API (none: the centre crop; flip: it and its mirror, twice the
    backbone's work). Training and its per-epoch validation never use it (they read cached crops)."""
    freeze_backbone: bool = True
    """Frozen backbones have their features cached on disk once; unfrozen ones train end to end."""
    train_tail: int = Field(0, ge=0)
    """With a frozen backbone: how many of its last parts still train, at ``train.backbone_lr``, on cached
    feature maps of the frozen rest (1 = the final 1x1 convolution, 2 = it and the last stage, ...; timm's
    EfficientNet family: MobileNetV2, EfficientNet, EfficientNet-Lite). 0 = none. The checkpoint keeps the
    trained weights, so evaluation and the service run the whole tuned backbone."""
    hidden_layers: int = Field(0, ge=0)
    """Extra [ReLU -> Dropout -> Linear] blocks after the first projection."""
    dropout: float = Field(0.2, ge=0.0, lt=1.0)

    @field_validator("backbone_kwargs")
    @classmethod
    def _no_weight_sources(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        refused = sorted(set(kwargs) & REFUSED_BACKBONE_KWARGS)
        if refused:
            raise ValueError(f"{', '.join(refused)} may not be set in backbone_kwargs: timm would read weights "
                             "or files through them; give a local weights file in model.image.weights "
                             "(and timm's own download in model.image.pretrained)")
        return kwargs

    @property
    def effective_resize(self) -> int:
        return self.resize_size or round(self.image_size * 256 / 224)


class PersonalityConfig(_Strict):
    enabled: bool = True
    """False drops the trait from the query entirely (the no-personality ablation)."""
    traits_file: str | None = None
    """One trait per line, synonyms in parentheses; None = the traits found in the training data."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class TextEncoderConfig(_Strict):
    kind: Literal["transformer", "bow"] = "transformer"
    """transformer: a Hugging Face encoder, mean-pooled; bow: mean of learned word embeddings."""
    model: str = "all-MiniLM-L6-v2"
    """Transformer: 'all-MiniLM-L6-v2' (bundled, offline), a local folder, or a hub name."""
    max_length: int = Field(64, ge=4, le=512)
    """Captions are truncated to this many tokens."""
    freeze: Literal["always", "never", "until_plateau"] = "always"
    """Whether the transformer's own weights train: never, always, or once validation stops improving."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    project: bool = True
    """Map pooled outputs through Dropout -> Linear; false keeps the encoder's own space (a linear probe,
    which needs model.hidden_dim equal to the encoder's width)."""
    bow_embed_dim: int = Field(300, ge=8)
    """Word-embedding width of the bag-of-words encoder."""
    bow_max_vocab: int = Field(30000, ge=10)
    bow_min_count: int = Field(1, ge=1)


Family = Literal["retrieval", "showtell", "showatttell", "updown"]
"""retrieval: TransResNet (ranks fixed captions); the others write captions (``transresnet.generation``)."""


class CaptionVocabConfig(_Strict):
    level: Literal["word", "char"] = "word"
    """word: lower-cased, punctuation-stripped words; char: the characters of that text (min-char-rnn)."""
    min_count: int = Field(3, ge=1)
    """Words seen fewer times in the training captions become <unk>."""
    max_size: int = Field(10000, ge=8)
    max_tokens: int = Field(20, ge=2)
    """Training captions are cut to this many tokens (before <eos>)."""


class DecodingConfig(_Strict):
    method: Literal["greedy", "sample", "beam"] = "beam"
    beam_size: int = Field(3, ge=1, le=64)
    length_penalty: Literal["none", "avg", "wu"] = "wu"
    """How beam search ranks finished captions: raw log-probability, its mean per token, or Wu et al.'s
    ((5 + length) / 6) ** alpha."""
    alpha: float = Field(0.7, ge=0.0)
    min_length: int = Field(1, ge=0)
    """Fewest words before <eos> may be chosen."""
    max_length: int = Field(20, ge=1)
    """Most words; <eos> is forced after them."""
    no_repeat_ngram: int = Field(0, ge=0)
    """Block any n-gram of this size from repeating within a caption (0 = off)."""
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)


class DecoderConfig(_Strict):
    """The generative families' decoder (used when model.family is not retrieval)."""

    cell: Literal["rnn", "gru", "lstm"] = "lstm"
    """rnn: vanilla tanh RNN; gru; lstm."""
    embed_dim: int = Field(256, ge=4)
    hidden_dim: int = Field(512, ge=4)
    feature_dim: int = Field(512, ge=4)
    """Width the backbone's grid features are projected to."""
    attention_dim: int = Field(256, ge=4)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    image_input: Literal["init_state", "first_input"] = "init_state"
    """ShowTell: the image initialises the state, or is the input of a step before <bos>."""
    image_every_step: bool = False
    """ShowTell: also feed the image at every step (the lecture's h = tanh(Wxh x + Whh h + Wih v))."""
    trait_dim: int = Field(64, ge=1)
    """Width of the trait embedding fed at every step (model.personality.enabled: false drops it)."""
    trait_in_init: bool = False
    """Also add the trait into the decoder's initial state."""
    vocab: CaptionVocabConfig = Field(default_factory=CaptionVocabConfig)
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    """Decoding for evaluation (training validates greedily)."""


class ModelConfig(_Strict):
    image: ImageEncoderConfig = Field(default_factory=ImageEncoderConfig)
    family: Family = "retrieval"
    """Which model: the retrieval TransResNet, or a caption generator (showtell, showatttell, updown)."""
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    personality: PersonalityConfig = Field(default_factory=PersonalityConfig)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    hidden_dim: int = Field(500, ge=8)
    """Width of the joint space: query and caption vectors have this dimension."""
    combine: Literal["sum", "concat"] = "sum"
    """How image and personality encodings form the query: sum (the paper) or concat -> Linear."""
    scoring: Literal["dot", "cosine"] = "dot"
    """dot: raw inner product (the paper); cosine: unit vectors and a learned temperature."""
    init_temperature: float = Field(0.07, gt=0.0)
    """Initial softmax temperature for cosine scoring."""


class DataConfig(_Strict):
    train: str | None = None
    """Training data: CSV, Personality-Captions JSON or Karpathy dataset.json."""
    train_split: str | None = "train"
    val: str | None = None
    """Validation data; None = the val split of the training file."""
    val_split: str | None = "val"
    test: str | None = None
    """Held-out data reported once after training (with traits given, shuffled and withheld)."""
    test_split: str | None = "test"
    image_dir: str | None = None
    """Image folder, when not the default for the format (``images/`` beside the file)."""
    feature_cache: str = ".cache/features"
    """Where frozen-backbone features are cached, keyed by backbone, weights and preprocessing."""
    examples_per_image: int = Field(1, ge=1)
    """Examples drawn per image and batch; >1 puts the same photo in several voices in one batch."""
    augment_crops: int = Field(0, ge=0)
    """Extra cached feature views per image (random crops and flips) for frozen backbones."""
    synthesize: int | None = Field(None, ge=10)
    """Draw this many synthetic images (``transresnet data synth``) into the folder of ``train`` when that
    file does not exist yet, so the config trains as written on a fresh clone; None = never."""


class PretrainConfig(_Strict):
    """Generators: language-model pretraining of the decoder on a caption pool, before captioning.

    The pool's captions are one token stream (``<bos> w1 .. wn <eos>`` per caption, shuffled per epoch) cut
    into ``batch_size`` parallel streams and trained ``bptt`` steps at a time (truncated backpropagation
    through time) with no image. Captions of any val or test image are excluded by image id and file stem.
    """

    captions: str | None = None
    """Caption pool (CSV with an image column, Personality-Captions JSON or Karpathy dataset.json);
    None = no pretraining."""
    split: str | None = None
    """Read only this split of the pool; None = every record (held-out images are excluded either way)."""
    bptt: int = Field(35, ge=1)
    """Steps per truncated-BPTT chunk; the hidden state carries over, detached, between chunks."""
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    """Parallel streams the token stream is split into."""
    lr: float = Field(1e-3, gt=0)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    """Chunks per epoch at most (None = the whole stream)."""


class ScheduledSamplingConfig(_Strict):
    """Generators: scheduled sampling (Bengio et al. 2015) during teacher forcing.

    At epoch e (counted from 0) each input token after ``<bos>`` is the model's own previous prediction
    instead of the gold token with probability ``max_prob * min(1, (e - start_epoch + 1) / ramp_epochs)``
    from ``start_epoch`` on (``max_prob`` at once when ``ramp_epochs`` is 0), else 0.
    """

    max_prob: float = Field(0.0, ge=0.0, le=1.0)
    """Highest probability of feeding the model's prediction; 0 = off (plain teacher forcing)."""
    start_epoch: int = Field(0, ge=0)
    """Epochs of plain teacher forcing before the ramp starts."""
    ramp_epochs: int = Field(5, ge=0)
    """Epochs over which the probability rises linearly to max_prob."""
    feed: Literal["sample", "argmax"] = "sample"
    """The prediction fed back: drawn from the model's distribution (the paper) or its most likely token."""


class SelfCriticalConfig(_Strict):
    """Generators: self-critical sequence training (Rennie et al. 2017) after the cross-entropy epochs.

    The best cross-entropy checkpoint is fine-tuned with REINFORCE on the CIDEr-D of candidate captions, sampled
    from the model or its best beams (document frequencies from the training references, an end token scored),
    minus a baseline: the mean reward of the other candidates of the same query (Luo 2020, ``mean``) or the
    reward of the greedy caption (Rennie et al., ``greedy``). Each epoch is validated and selected on greedy
    val CIDEr-D like the others, with the same patience.
    """

    epochs: int = Field(0, ge=0)
    """Self-critical epochs after cross entropy; 0 = off."""
    lr: float = Field(5e-5, gt=0)
    """Learning rate of the fine-tuning (a fresh Adam)."""
    samples: int = Field(5, ge=1)
    """Candidate captions per (image, trait) query per step."""
    candidates: Literal["sample", "beam"] = "sample"
    """Where they come from: drawn from the model (temperature 1), or the ``samples`` best beams of a beam
    search that wide (then scored by teacher forcing; Cornia et al. 2020)."""
    baseline: Literal["mean", "greedy"] = "mean"
    """The reward subtracted: the other samples' mean (needs samples >= 2) or the greedy caption's."""
    batch_size: int = Field(50, ge=1)
    """(image, trait) queries per step (each sampled ``samples`` times)."""

    @model_validator(mode="after")
    def _check_baseline(self) -> SelfCriticalConfig:
        if self.baseline == "mean" and self.epochs and self.samples < 2:
            raise ValueError("train.self_critical.baseline mean needs samples >= 2 (or use baseline: greedy)")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(5e-4, gt=0)
    text_lr: float = Field(2e-5, gt=0)
    """Learning rate of the transformer's own weights when they train."""
    backbone_lr: float = Field(5e-5, gt=0)
    """Learning rate of the image backbone's trained last parts (``model.image.train_tail``)."""
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    device: Device = "auto"
    amp: bool = True
    """Mixed precision on the GPU (ignored on CPU)."""
    patience: int = Field(3, ge=1)
    """Epochs without validation improvement before stopping (or unfreezing, with until_plateau)."""
    num_workers: int = Field(0, ge=0)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    hard_negatives: int = Field(0, ge=0)
    """Extra negatives per batch from the training caption pool: the captions (gold for no query in the batch)
    scoring highest against the batch's queries under the current model; 0 = in-batch negatives only."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Generators: label smoothing of the word cross entropy."""
    grad_clip: float | None = Field(5.0, gt=0.0)
    """Generators: clip the gradient norm to this (None = no clipping)."""
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    """Generators: language-model pretraining of the decoder (off unless pretrain.captions is set)."""
    scheduled_sampling: ScheduledSamplingConfig = Field(default_factory=ScheduledSamplingConfig)
    """Generators: scheduled sampling (off while max_prob is 0)."""
    self_critical: SelfCriticalConfig = Field(default_factory=SelfCriticalConfig)
    """Generators: self-critical (CIDEr-D reward) fine-tuning after cross entropy (off while epochs is 0)."""


class ExperimentConfig(_Strict):
    name: str = "experiment"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check_combination(self) -> ExperimentConfig:
        if self.data.augment_crops and not self.model.image.freeze_backbone:
            raise ValueError("data.augment_crops needs model.image.freeze_backbone: true (crops are cached features)")
        if self.model.image.train_tail and not (self.model.image.freeze_backbone and self.model.family == "retrieval"):
            raise ValueError("model.image.train_tail trains the last parts of a frozen, cached backbone: it needs "
                             "model.image.freeze_backbone: true and model.family retrieval")
        if self.model.family != "retrieval" and not self.model.image.freeze_backbone:
            raise ValueError(f"model.family {self.model.family} needs model.image.freeze_backbone: true (the decoders "
                             "read cached grid features)")
        generator_only = (self.train.pretrain.captions or self.train.scheduled_sampling.max_prob
                          or self.train.self_critical.epochs)
        if self.model.family == "retrieval" and generator_only:
            raise ValueError("train.pretrain, train.scheduled_sampling and train.self_critical are for caption "
                             "generators (model.family showtell, showatttell or updown), not retrieval")
        return self


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-3`` -> ('train.lr', 0.001); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config model of the section holding the key at ``loc`` (None when it is not a model)."""
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def did_you_mean(loc: tuple[Any, ...]) -> str:
    """For an unknown key: ' (did you mean train.epochs?)' naming the closest valid keys, or ''."""
    model = _section_model(loc)
    if model is None or not loc:
        return ""
    prefix = ".".join(str(p) for p in loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=3, cutoff=0.6)
    names = [f"{prefix}.{name}" if prefix else name for name in close]
    return f" (did you mean {' or '.join(names)}?)" if names else ""


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        hint = did_you_mean(tuple(problem["loc"])) if problem["type"] == "extra_forbidden" else ""
        lines.append(f"  {key}: {problem['msg']}{hint}")
    return "invalid config:\n" + "\n".join(lines)


def build_config(tree: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    tree = dict(tree)
    for override in overrides or []:
        key, value = parse_override(override)
        _set_dotted(tree, key, value)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def shipped_config(name: str) -> Path:
    """A config that ships with the package (``configs/`` in a checkout, package data when installed)."""
    from importlib import resources

    path = Path(str(resources.files("transresnet.configs").joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config {name!r} in {path.parent}")
    return path


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML setup, apply ``key=value`` overrides and validate the result."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found (see configs/ for the shipped setups)")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a YAML mapping at the top level")
    return build_config(tree, overrides)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
