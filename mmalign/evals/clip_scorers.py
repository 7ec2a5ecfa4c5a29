"""Image evaluators: an open_clip backbone (mmalign.evals.clip_backbone) plus a head.

With î, t̂ the L2-normalised image and prompt embeddings and cos = î·t̂:
- CLIPScore (Hessel et al. 2021, w = 100):  100 · max(cos, 0).
- PickScore-style preference (Kirstain et al. 2023): s = exp(logit_scale) · cos per image; a prompt's images
  get preference probabilities softmax(s) over that prompt's images; P(A ≻ B) = e^{s_A} / (e^{s_A} + e^{s_B}).
- HPSv2 (Wu et al. 2023): cos on an open_clip ViT-H-14 whose weights are the HPS state dict.
- LAION aesthetic predictor: an MLP (768→1024→128→64→16→1, dropout between the first layers, identity at
  inference) on î of CLIP ViT-L/14; the prompt is not used.
Every scorer is deterministic (eval mode, fp32, CPU), batched, and carries provenance (weights sha256).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..assets import SHAPEWORLD_CLIP as SHIPPED_CLIP
from ..core.config import ConfigError
from .clip_backbone import ClipBackbone, load_backbone, load_checked

SCORERS = ("clipscore", "pickscore", "hpsv2", "aesthetic")
# Architecture a bare weights file is read with when none is given (what the public weights were trained on).
DEFAULT_ARCH = {"pickscore": "ViT-H-14", "hpsv2": "ViT-H-14", "aesthetic": "ViT-L-14-quickgelu"}
# The published weights a scorer's numbers mean something with, and how to pass them: a scorer refuses to run
# without them (only CLIPScore has a default backbone, the shipped ShapeWorld CLIP).
NEEDS_MODEL = {
    "pickscore": "pickscore needs its published weights, yuvalkirstain/PickScore_v1 (CLIP ViT-H/14): pass --model "
                 "as an open_clip model directory (open_clip_config.json + weights) or a weights file (read as "
                 "--arch ViT-H-14); the hub copy is a transformers checkpoint and must be converted to open_clip's "
                 "layout first",
    "hpsv2": "hpsv2 needs its published weights: pass --model HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt, "
             "from xswu/HPSv2 on the Hugging Face hub), read on open_clip ViT-H-14",
    "aesthetic": "aesthetic needs its backbone, OpenAI CLIP ViT-L/14: pass --model openai (open_clip downloads it; "
                 "read as --arch ViT-L-14-quickgelu) or hf-hub:timm/vit_large_patch14_clip_224.openai or a local "
                 "copy",
}
NEEDS_HEAD = ("aesthetic needs the LAION aesthetic predictor head: pass --head sac+logos+ava1-l14-linearMSE.pth "
              "(christophschuhmann/improved-aesthetic-predictor), an MLP on CLIP ViT-L/14 image embeddings")


def paired_cosines(backbone: ClipBackbone, images, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """cos(î_i, t̂_i) for each (image, prompt) pair; each distinct prompt is encoded once."""
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image: {len(images)} images, {len(prompts)} prompts")
    if not prompts:
        return torch.zeros(0)
    distinct = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    txt = backbone.text_embeddings(list(distinct))
    rows = torch.tensor([distinct[p] for p in prompts])
    img = backbone.image_embeddings(images, batch_size)
    return (img * txt[rows]).sum(-1)


def clipscore_from_cosine(cos: torch.Tensor) -> torch.Tensor:
    return 100.0 * cos.clamp(min=0)


def preference_probs(scores) -> torch.Tensor:
    """softmax over one prompt's images of their PickScore-style scores."""
    return torch.softmax(torch.as_tensor(scores, dtype=torch.float64), dim=0)


def pairwise_preference(score_a: float, score_b: float) -> float:
    """P(A ≻ B) = e^{s_A} / (e^{s_A} + e^{s_B}) = sigmoid(s_A - s_B)."""
    return float(torch.sigmoid(torch.tensor(score_a - score_b, dtype=torch.float64)))


class CLIPScore:
    name = "clipscore"

    def __init__(self, backbone: ClipBackbone):
        self.backbone = backbone

    @property
    def provenance(self) -> dict:
        return {"scorer": self.name, "backbone": self.backbone.provenance}

    def score(self, images, prompts: list[str], batch_size: int = 64) -> list[float]:
        return clipscore_from_cosine(paired_cosines(self.backbone, images, prompts, batch_size)).tolist()


class PickScore(CLIPScore):
    name = "pickscore"

    def score(self, images, prompts: list[str], batch_size: int = 64) -> list[float]:
        """exp(logit_scale) · cos per (image, prompt)."""
        return (self.backbone.logit_scale * paired_cosines(self.backbone, images, prompts, batch_size)).tolist()

    def prompt_preferences(self, images, prompt: str) -> list[float]:
        """Preference probabilities of one prompt's images (they sum to 1)."""
        return preference_probs(self.score(images, [prompt] * len(images))).tolist()


class HPSv2(CLIPScore):
    name = "hpsv2"

    def score(self, images, prompts: list[str], batch_size: int = 64) -> list[float]:
        return paired_cosines(self.backbone, images, prompts, batch_size).tolist()


class AestheticHead(nn.Module):
    """The public LAION predictor's layer layout (state-dict keys layers.0/2/4/6/7)."""

    def __init__(self, in_dim: int = 768, hidden: tuple[int, ...] = (1024, 128, 64, 16)):
        super().__init__()
        h1, h2, h3, h4 = hidden
        self.layers = nn.Sequential(nn.Linear(in_dim, h1), nn.Dropout(0.2), nn.Linear(h1, h2), nn.Dropout(0.2),
                                    nn.Linear(h2, h3), nn.Dropout(0.1), nn.Linear(h3, h4), nn.Linear(h4, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


class Aesthetic:
    name = "aesthetic"

    def __init__(self, backbone: ClipBackbone, head: AestheticHead, head_provenance: dict | None = None):
        self.backbone, self.head = backbone, head.eval()
        self.head_provenance = head_provenance or {}

    @classmethod
    def load(cls, backbone: ClipBackbone, head_path: str | Path) -> "Aesthetic":
        head = AestheticHead(backbone.model.text_projection.shape[-1])
        sha = load_checked(head, head_path, what="aesthetic head")
        return cls(backbone, head, {"weights": str(head_path), "weights_sha256": sha})

    @property
    def provenance(self) -> dict:
        return {"scorer": self.name, "backbone": self.backbone.provenance, "head": self.head_provenance}

    @torch.no_grad()
    def score(self, images, prompts: list[str] | None = None, batch_size: int = 64) -> list[float]:
        return self.head(self.backbone.image_embeddings(images, batch_size)).tolist()


def check_weights_given(kind: str, model, head) -> None:
    """Refuse a scorer whose published weights are not given (ConfigError naming them and the option)."""
    if kind not in SCORERS:
        raise ConfigError(f"unknown scorer {kind!r}; choose one of {', '.join(SCORERS)}")
    missing = [NEEDS_HEAD] if kind == "aesthetic" and head is None else []
    missing += [NEEDS_MODEL[kind]] if model is None and kind in NEEDS_MODEL else []
    if missing:
        raise ConfigError("; ".join(missing))


def make_scorer(kind: str, model: str | Path | None = None, arch: str | Path | None = None,
                head: str | Path | None = None):
    """A scorer from a backbone source (see clip_backbone.resolve); `head` is the aesthetic head file. Only
    CLIPScore has a default backbone (the shipped ShapeWorld CLIP); the others need their weights given."""
    check_weights_given(kind, model, head)
    model = SHIPPED_CLIP if model is None else model
    if arch is None and not Path(model).is_dir() and not str(model).startswith("hf-hub:"):
        arch = DEFAULT_ARCH.get(kind)
    backbone = load_backbone(model, arch)
    if kind == "aesthetic":
        return Aesthetic.load(backbone, head)
    return {"clipscore": CLIPScore, "pickscore": PickScore, "hpsv2": HPSv2}[kind](backbone)


def load_hpsv2(weights: str | Path, arch: str | Path = "ViT-H-14") -> HPSv2:
    return HPSv2(load_backbone(weights, arch))


def load_aesthetic(head: str | Path, backbone: str | Path, arch: str | Path | None = "ViT-L-14-quickgelu") -> Aesthetic:
    return Aesthetic.load(load_backbone(backbone, None if Path(backbone).is_dir() else arch), head)


def load_shipped_clipscore() -> CLIPScore:
    """CLIPScore on the shipped tiny ShapeWorld CLIP (offline)."""
    return CLIPScore(load_backbone(SHIPPED_CLIP))


def score_images(scorer, images, prompts: list[str], batch_size: int = 64) -> list[float]:
    """Per-image scores of in-memory PIL images against their prompts (one prompt per image)."""
    return scorer.score(images, list(prompts), batch_size)
