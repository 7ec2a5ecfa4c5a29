"""Rewards for online RL, by name and weight: a reward is a callable (images: list of PIL images, prompts: list of
str) -> one float per image (a list or a tensor).

Names: `shapeworld` (the exact ShapeWorld scorer, `onpolicy.shapeworld_reward`: share of the caption's
attributes that hold + 1 when all do, in [0, 2]), `clipscore` (CLIPScore, 100·max(cos, 0), on the shipped
ShapeWorld CLIP), or any importable `module:function` with the signature above. Several are combined as a
weighted sum; each one's mean and std are logged on their own (a hard reward stalls unseen inside a sum), and
held-out rewards are computed and logged but never trained on (a rising trained reward with a flat or falling
held-out one is reward hacking). A reward that returns a NaN or infinite value, a non-number, or another count
than one per image stops the run with a RewardError naming it.
"""
from __future__ import annotations

from importlib import import_module
from typing import Callable, Sequence

import torch
from PIL import Image

from .onpolicy import shapeworld_reward

RewardFn = Callable[[list, list], Sequence[float] | torch.Tensor]
# Built-in names -> "module:factory" returning a scorer with .score(images, prompts); evals is reached by name,
# as core.registry reaches the method families (diffusion does not import evals).
FACTORIES = {"clipscore": "mmalign.evals.clip_scorers:load_shipped_clipscore"}


class RewardError(ValueError):
    pass


def shapeworld_scores(images: list, prompts: list[str]) -> list[float]:
    """`onpolicy.shapeworld_reward` per (image, prompt)."""
    return [shapeworld_reward(im, p) for im, p in zip(images, prompts)]


def resolve(spec: str):
    """The object `module:attr` names; a RewardError saying what is wrong otherwise."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise RewardError(f"reward {spec!r}: expected a built-in name ({', '.join(known())}) or 'module:function'")
    try:
        obj = getattr(import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"reward {spec!r}: cannot import it ({e})") from None
    if not callable(obj):
        raise RewardError(f"reward {spec!r}: {type(obj).__name__} is not callable")
    return obj


def known() -> list[str]:
    return ["shapeworld", *FACTORIES]


def load_reward(name: str) -> RewardFn:
    """The reward callable for a built-in name or a `module:function` spec."""
    if name == "shapeworld":
        return shapeworld_scores
    if name in FACTORIES:
        return resolve(FACTORIES[name])().score
    return resolve(name)


def checked(name: str, values, n: int) -> torch.Tensor:
    """values as a float64 tensor [n]; a RewardError naming the reward for a wrong count, non-numbers, NaN/inf."""
    try:
        t = torch.as_tensor(values if torch.is_tensor(values) else list(values), dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise RewardError(f"reward {name!r}: returned {type(values).__name__}, not numbers ({e})") from None
    if t.dim() != 1 or len(t) != n:
        raise RewardError(f"reward {name!r}: returned shape {tuple(t.shape)} for {n} images (one float per image)")
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero().flatten()[:5].tolist()
        raise RewardError(f"reward {name!r}: returned a non-finite value (NaN or inf) at image(s) {bad}")
    return t


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [0, 1] -> RGB PIL images."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def metric_name(name: str) -> str:
    return name.replace(":", ".")


class Rewards:
    """The trained weighted sum and the held-out rewards. `weights`: {name: weight}; `heldout`: names."""

    def __init__(self, weights: dict[str, float], heldout: Sequence[str] = ()):
        if not weights:
            raise RewardError("reward: name at least one reward to train on (e.g. {shapeworld: 1.0})")
        both = sorted(set(weights) & set(heldout))
        if both:
            raise RewardError(f"reward {both[0]!r} is both trained on and held out (held out: never trained on)")
        self.weights, self.heldout = dict(weights), list(heldout)
        self.fns = {n: load_reward(n) for n in dict.fromkeys([*self.weights, *self.heldout])}

    def __call__(self, images, prompts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """(weighted total [N] float64, metrics): reward/<name>_mean and _std per trained reward, reward_mean and
        reward_std of the total, heldout/<name>_mean and _std per held-out reward."""
        pil = to_pil(images) if torch.is_tensor(images) else list(images)
        if len(pil) != len(prompts):
            raise ValueError(f"{len(pil)} images but {len(prompts)} prompts")
        values = {n: checked(n, fn(pil, list(prompts)), len(pil)) for n, fn in self.fns.items()}
        total = sum(w * values[n] for n, w in self.weights.items())
        metrics = {"reward_mean": float(total.mean()), "reward_std": float(total.std(unbiased=False))}
        for n, v in values.items():
            key = f"{'heldout' if n not in self.weights else 'reward'}/{metric_name(n)}"
            metrics.update({f"{key}_mean": float(v.mean()), f"{key}_std": float(v.std(unbiased=False))})
        return total, metrics
