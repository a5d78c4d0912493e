"""The TransResNet dual encoder and its factory.

``encode_query`` (image + personality) and ``encode_text`` (captions) are the one code path that
training, index building, evaluation and serving all use, so stored and query vectors always match.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from transresnet.config import ExperimentConfig, ModelConfig
from transresnet.encoders import (
    ImageMLP,
    PersonalityEncoder,
    TextEncoder,
    create_backbone,
    create_text_encoder,
    tail_parameters,
)
from transresnet.features import pooled_features
from transresnet.options import ImageTTA
from transresnet.traits import TraitVocab


def _hub_snapshot(name: str, *, revision: str | None, cache_dir: str | Path | None, token: str | None,
                  error: type[Exception]) -> Path:
    """Download (or find in the local cache) a hub repository; a clear error when that is not possible."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise error(f"checkpoint directory {name} not found")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=name, revision=revision, cache_dir=cache_dir, token=token))
    except LocalEntryNotFoundError:
        raise error(f"{name} is neither a checkpoint directory nor a hub repository in the local cache, and "
                    "the hub is not reachable (offline, or HF_HUB_OFFLINE=1): pass a checkpoint directory") from None
    except (HfHubHTTPError, ValueError) as err:
        raise error(f"could not fetch {name} from the Hugging Face Hub: {err}") from None


class TransResNet(nn.Module):
    def __init__(self, config: ModelConfig, traits: TraitVocab, backbone: nn.Module, image_mlp: ImageMLP,
                 personality: PersonalityEncoder | None, concat_proj: nn.Linear | None, text: TextEncoder) -> None:
        super().__init__()
        self.config = config
        self.traits = traits
        self.backbone = backbone
        self.image_mlp = image_mlp
        self.personality = personality
        self.concat_proj = concat_proj
        self.text = text
        # log(1 / temperature); only used by cosine scoring.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self.backbone.requires_grad_(not config.image.freeze_backbone)
        if config.image.train_tail:
            for weight in tail_parameters(backbone, config.image.train_tail):
                weight.requires_grad_(True)

    @property
    def embed_dim(self) -> int:
        return self.config.hidden_dim

    def save_pretrained(self, directory: str | Path, *, config: ExperimentConfig | None = None) -> Path:
        """Save as a checkpoint directory (``from_pretrained`` and ``transresnet serve`` load it).

        ``config``: the experiment config to record; by default one holding just this model's section.
        """
        from transresnet.checkpoint import save_checkpoint

        return save_checkpoint(self, config or ExperimentConfig(model=self.config), directory)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str | torch.device = "cpu",
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        token: str | None = None) -> TransResNet:
        """A checkpoint directory, or a Hugging Face Hub repository holding one (downloaded with
        ``huggingface_hub.snapshot_download``; a local directory never touches the network)."""
        from transresnet.checkpoint import CheckpointError, load_checkpoint

        path = Path(name_or_path)
        if not path.is_dir():
            path = _hub_snapshot(str(name_or_path), revision=revision, cache_dir=cache_dir, token=token,
                                 error=CheckpointError)
        return load_checkpoint(path, device=device).model

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def train(self, mode: bool = True) -> TransResNet:
        super().train(mode)
        if self.config.image.freeze_backbone:
            self.backbone.eval()  # frozen batch-norm statistics stay as pretrained
        return self

    def _finish(self, vectors: torch.Tensor) -> torch.Tensor:
        vectors = vectors.float()
        return F.normalize(vectors, dim=-1) if self.config.scoring == "cosine" else vectors

    def encode_image(self, images: torch.Tensor, *, tta: ImageTTA | None = None) -> torch.Tensor:
        """Preprocessed pixels (B, 3, H, W) -> pooled backbone features (B, F), averaged over the test-time
        views ``tta`` (default: the config's ``image.tta``; training passes "none")."""
        tta = self.config.image.tta if tta is None else tta
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.image.freeze_backbone):
            return pooled_features(self.backbone, images.to(self.device), tta)

    def encode_personality(self, trait_ids: torch.Tensor) -> torch.Tensor:
        if self.personality is None:
            raise RuntimeError("this model was built without a personality encoder")
        return self.personality(trait_ids.to(self.device))

    def encode_query(self, *, trait_ids: torch.Tensor, images: torch.Tensor | None = None,
                     features: torch.Tensor | None = None) -> torch.Tensor:
        """Image (pixels or cached backbone features) plus trait slots -> query vectors (B, D)."""
        if (images is None) == (features is None):
            raise ValueError("encode_query takes exactly one of images= or features=")
        if features is None:
            features = self.encode_image(images)
        query = self.image_mlp(features.to(self.device).float())
        if self.personality is not None:
            persona = self.encode_personality(trait_ids)
            if self.concat_proj is not None:
                query = self.concat_proj(torch.cat([query, persona], dim=-1))
            else:
                query = query + persona
        return self._finish(query)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions -> caption vectors (N, D)."""
        return self._finish(self.text(texts))

    def encode_pooled_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """Cached text-encoder outputs -> caption vectors; equals ``encode_text`` on the same captions."""
        return self._finish(self.text.head(pooled.to(self.device)))

    def logits(self, queries: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        scores = queries @ captions.T
        if self.config.scoring == "cosine":
            scores = scores * self.logit_scale.exp().clamp(max=100.0)
        return scores


def _feature_dim(backbone: nn.Module) -> int:
    return int(backbone.num_features)


def create_model(config: ModelConfig, traits: TraitVocab, *, captions: Iterable[str] | None = None,
                 text_assets: Path | None = None, load_weights: bool = True) -> TransResNet:
    """Build a TransResNet from its config.

    ``load_weights=False`` skips pretrained weight files (a checkpoint supplies all weights afterwards);
    ``captions`` builds a bag-of-words vocabulary; ``text_assets`` is a checkpoint's saved tokenizer/vocab.
    """
    backbone = create_backbone(config.image, load_weights=load_weights)
    image_mlp = ImageMLP(_feature_dim(backbone), config.hidden_dim, config.image.hidden_layers,
                         config.image.dropout)
    personality = None
    concat_proj = None
    if config.personality.enabled:
        personality = PersonalityEncoder(len(traits), config.hidden_dim, config.personality.dropout)
        if config.combine == "concat":
            concat_proj = nn.Linear(2 * config.hidden_dim, config.hidden_dim)
    text = create_text_encoder(config.text, config.hidden_dim, captions=captions, assets=text_assets,
                               load_weights=load_weights)
    return TransResNet(config, traits, backbone, image_mlp, personality, concat_proj, text)
