"""A video model's own text encoder: an image base's text encoder trained on still-image captions may not separate
words that only matter for motion ("left" vs "right"), so a motion adapter directory can ship a `text_encoder/`
sub-folder (a `CLIPTextModel`) that replaces the base's in every video path (`sampling.video_pipeline`,
`methods.VideoMethod.build`); the image pipeline itself is untouched.

`VideoTextTemporalTraining` trains it jointly with the motion modules (video_temporal on in-memory clips): the
policy encodes token ids itself (`TextVideoDenoiser`), so the caption's embedding gets the denoising gradient;
optional `sep_weight`: a hinge pushing captions that differ only in the direction word apart (relative distance
of the whole embedding sequence below `sep_margin` is penalised); optional `contrast_weight`: `caption_contrast_loss`,
which asks the true caption to denoise the clip better than its direction swaps at the same x_t and noise.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel

from ..core.row_rng import RowRandom
from ..diffusion.losses import per_sample_mse, sft_loss
from ..diffusion.pipeline import diffusion_target
from .clips import TensorRows
from .methods import VideoDenoiser, VideoTemporalTraining

TEXT_ENCODER = "text_encoder"  # optional sub-folder of an adapter directory: the video model's text encoder
DIRECTIONS = ("left", "right", "up", "down")


def shipped_text_encoder(motion_dir: str | Path) -> CLIPTextModel | None:
    """The text encoder an adapter directory ships in its `text_encoder/` sub-folder, else None."""
    path = Path(motion_dir) / TEXT_ENCODER
    return CLIPTextModel.from_pretrained(path) if (path / "config.json").is_file() else None


def text_encoder_differs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return any(k not in sb or not torch.equal(v.cpu(), sb[k].cpu()) for k, v in a.state_dict().items())


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """(N, L) padded token ids, as `diffusion.pipeline.encode_prompts` tokenizes."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def word_ids(tokenizer, words) -> list[int]:
    """The token id of each word (each must be a single token)."""
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in words]
    bad = [w for w, i in zip(words, ids) if len(i) != 1]
    if bad:
        raise ValueError(f"not single tokens for this tokenizer: {bad}")
    return [i[0] for i in ids]


class TextVideoDenoiser(VideoDenoiser):
    """The video denoiser with its text encoder inside: the third argument is token ids (B, L)."""

    def __init__(self, unet, text_encoder):
        super().__init__(unet)
        self.text_encoder = text_encoder

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids)[0]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(x_t, t, self.encode(ids))


def direction_swaps(ids: torch.Tensor, word_ids: list[int]) -> torch.Tensor:
    """(B, L) ids -> (B, D-1, L): each caption with its direction token replaced by every other direction."""
    out = []
    for row in ids:
        pos = [i for i, w in enumerate(row.tolist()) if w in word_ids]
        if len(pos) != 1:
            raise ValueError(f"a caption needs exactly one direction word, got ids {row.tolist()}")
        own = int(row[pos[0]])
        alts = []
        for w in word_ids:
            if w != own:
                alt = row.clone()
                alt[pos[0]] = w
                alts.append(alt)
        out.append(torch.stack(alts))
    return torch.stack(out)


def separation_loss(policy: TextVideoDenoiser, ids: torch.Tensor, word_ids: list[int], margin: float) -> torch.Tensor:
    """mean hinge relu(margin - |e(c) - e(c')| / |e(c)|) over each caption c and its direction swaps c'."""
    alts = direction_swaps(ids, word_ids)
    b, k, n = alts.shape
    e = policy.encode(ids)
    e_alt = policy.encode(alts.reshape(b * k, n).to(ids.device)).reshape(b, k, *e.shape[1:])
    rel = (e_alt - e[:, None]).flatten(2).norm(dim=-1) / e.flatten(1).norm(dim=-1)[:, None]
    return torch.relu(margin - rel).mean()


def caption_contrast_loss(errors: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which caption denoises this clip? errors (B, 1 + K): per-clip denoising errors at one x_t and noise, column 0
    under the true caption, columns 1.. under its direction swaps. Relative logits z_k = -e_k / (tau * sg(e_0)) and

        L = -log softmax(z)_0 = log sum_k exp(-(e_k - e_0) / (tau * sg(e_0)))

    so a swap that fits 1 % worse than the true caption is one logit unit behind at tau = 0.01. The noise term is
    shared by all columns, so their differences carry only the caption's effect: a low-variance signal for a word
    whose effect on the plain denoising loss is tiny. Returns (loss, share of clips whose true caption fits best)."""
    if errors.dim() != 2 or errors.shape[1] < 2:
        raise ValueError(f"errors must be (B, 1 + K) with K >= 1, got {tuple(errors.shape)}")
    logits = -errors / (temperature * errors[:, :1].detach().clamp_min(1e-12))
    labels = torch.zeros(len(errors), dtype=torch.long, device=errors.device)
    return F.cross_entropy(logits, labels), (errors.argmin(dim=1) == 0).float().mean()


class VideoTextTemporalTraining(VideoTemporalTraining):
    """video_temporal with the text encoder trained too (in-memory `data=[(caption, frames), ...]` only)."""

    def __init__(self, cfg, output_dir: str, data: list, sep_weight: float = 0.0, sep_margin: float = 0.5,
                 contrast_weight: float = 0.0, contrast_temp: float = 0.01, text_trainable: bool = True):
        super().__init__(cfg, output_dir, data=data)
        self.text_trainable = text_trainable  # False: the captions go in as ids, the text encoder stays frozen
        self.sep_weight, self.sep_margin = sep_weight, sep_margin
        self.contrast_weight, self.contrast_temp = contrast_weight, contrast_temp

    def build(self, device: torch.device) -> TextVideoDenoiser:
        policy = super().build(device)
        te = self.parts.text_encoder.requires_grad_(self.text_trainable).train(self.text_trainable)
        self.word_ids = (word_ids(self.parts.tokenizer, DIRECTIONS) if self.sep_weight > 0 or self.contrast_weight > 0
                         else [])
        return TextVideoDenoiser(policy.unet, te)

    def dataset(self):
        rows, report = super().dataset()
        ids = token_ids(self.parts.tokenizer, [c for c, _ in self.data])
        return TensorRows(**rows.columns, ids=ids), report

    def loss(self, policy, batch):
        rows = RowRandom.of(batch)
        x0 = self.latents(batch, rows)
        noise = rows.randn("noise", x0.shape[1:], x0.device, x0.dtype)
        t = self.sample_t(rows, x0.device)
        sched = self.parts.noise_scheduler
        x_t, target, ids = sched.add_noise(x0, noise, t), diffusion_target(sched, x0, noise, t), batch["ids"]
        if self.contrast_weight > 0:  # the true caption and its direction swaps in one call, same x_t and noise
            alts = direction_swaps(ids, self.word_ids).to(ids.device)
            b, k, n = alts.shape
            every = torch.cat([ids[:, None], alts], dim=1).reshape(b * (k + 1), n)
            rep = functools.partial(torch.repeat_interleave, repeats=k + 1, dim=0)
            errors = per_sample_mse(policy(rep(x_t), rep(t), every), rep(target)).reshape(b, k + 1)
            loss, metrics = sft_loss(errors[:, 0])
            contrast, best = caption_contrast_loss(errors, self.contrast_temp)
            gap = ((errors[:, 1:] - errors[:, :1]) / errors[:, :1]).mean()
            loss = loss + self.contrast_weight * contrast
            metrics = {**metrics, "contrast_loss": contrast.detach(), "true_caption_best": best,
                       "direction_gap": gap.detach()}
        else:
            loss, metrics = sft_loss(per_sample_mse(policy(x_t, t, ids), target))
        if self.sep_weight > 0:
            sep = separation_loss(policy, batch["ids"], self.word_ids, self.sep_margin)
            loss, metrics = loss + self.sep_weight * sep, {**metrics, "sep_loss": sep.detach()}
        return loss, metrics

    def save_pretrained(self, policy, out_dir: str) -> None:
        from .sampling import save_video_model

        save_video_model(self.cfg.model.pretrained, policy.unet, out_dir, text_encoder=policy.text_encoder)
