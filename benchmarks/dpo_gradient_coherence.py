"""Does a Diffusion-DPO batch gradient carry a direction, or only noise? At the base's own weights (policy =
reference) the DPO gradient is proportional to g = grad_theta mean_pairs [err_theta(w) - err_theta(l)], with one
t and noise per pair shared by winner and loser. This script draws g for K disjoint batches of pairs, twice each
with other noise, within bands of the noise level, and prints the mean cosines:

- same pairs, other noise draws (t and eps; a posterior sample stays the row's): how much of g is the pairs' and
  not the draw's;
- other pairs (every two of the K batches): how much of g the preference data share, what training can follow.
  Its standard error is over the K batches (the K(K-1)/2 cosines are not independent).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dpo_gradient_coherence.py --model mmalign/assets/shapeworld_sd \
        --pairs mmalign/assets/shapeworld_pairs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dpo_gradient_coherence.py --model mmalign/assets/shapeworld_sd3 \
        --pairs runs/calib/flowM/pairs_74a8f4c73c --errors velocity,epsilon

Noise levels are bands of sigma for a flow base (x = (1 - sigma) x0 + sigma eps) and the same bands of t / 1000
for a UNet base. A flow base's velocity error can also be scored as the epsilon error it implies,
(1 - sigma)^2 |v_hat - v|^2 (`--errors epsilon`), the weighting SD's Diffusion-DPO has. One JSON line per band.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch

from mmalign.core.config import from_dict
from mmalign.core.registry import method_class
from mmalign.core.row_rng import RowRandom
from mmalign.diffusion.losses import per_sample_mse
from mmalign.diffusion.pipeline import diffusion_target
from mmalign.diffusion.preference import PreferenceConfig, cat_cond


def band_t(parts, lo: float, hi: float, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n timesteps in the band [lo, hi) of sigma (flow) or t / N (UNet), and the flow's sigma (ones for a UNet)."""
    u = lo + (hi - lo) * torch.rand(n, generator=g)
    if parts.is_flow:
        sigma = u.clamp(min=1e-3)
        return sigma * parts.noise_scheduler.config.num_train_timesteps, sigma
    return (u * parts.noise_scheduler.config.num_train_timesteps).long(), torch.ones(n)


def gap_gradient(method, policy, batch, lo, hi, seed, error: str, draws: int = 1) -> torch.Tensor:
    """grad of mean_pairs(err(w) - err(l)), averaged over `draws` noise draws per pair in the band, flattened."""
    grads = [one_draw_gradient(method, policy, batch, lo, hi, seed * 1000 + k, error) for k in range(draws)]
    return torch.stack(grads).mean(0)


def one_draw_gradient(method, policy, batch, lo, hi, seed, error: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lat_w, lat_l, view = method.pair_latents(batch, RowRandom.of(batch))
    cond_w, cond_l = method.pair_cond(batch, view)
    n = len(lat_w)
    t, sigma = band_t(method.parts, lo, hi, n, g)
    noise = torch.randn(lat_w.shape, generator=g).repeat(2, 1, 1, 1)
    t2, x0 = t.repeat(2), torch.cat([lat_w, lat_l])
    sched = method.parts.noise_scheduler
    x_t = sched.add_noise(x0, noise, t2)
    err = per_sample_mse(policy(x_t, t2, cat_cond(cond_w, cond_l)), diffusion_target(sched, x0, noise, t2))
    if error == "epsilon" and method.parts.is_flow:
        err = err * (1 - sigma.repeat(2)) ** 2
    policy.zero_grad()
    (err[:n] - err[n:]).mean().backward()
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", required=True, help="a pair folder (metadata.jsonl + images)")
    ap.add_argument("--batch", type=int, default=32, help="pairs per gradient")
    ap.add_argument("--batches", type=int, default=12, help="disjoint batches of pairs per band (K)")
    ap.add_argument("--bands", default="0,0.2,0.4,0.6,0.8,1.0")
    ap.add_argument("--draws", type=int, default=1, help="noise draws per pair averaged into each gradient")
    ap.add_argument("--errors", default="velocity", help="velocity and/or epsilon (flow bases)")
    a = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="coherence_")
    cfg = from_dict(PreferenceConfig, {"model": {"pretrained": a.model},
                                       "data": {"path": a.pairs, "cache_dir": cache}}, "coherence")
    method = method_class("diffusion_dpo")(cfg, cache)
    policy = method.build(torch.device("cpu"))
    method.dataset()
    need = a.batch * a.batches
    if len(method.data) < need:
        raise SystemExit(f"{a.pairs}: {len(method.data)} pairs, {need} needed")
    order = torch.randperm(len(method.data), generator=torch.Generator().manual_seed(0)).tolist()
    batches = []
    for k in range(a.batches):
        rows = order[a.batch * k:a.batch * (k + 1)]
        batches.append(method.collate([method.data[i] for i in rows]))
        batches[-1]["row_seed"] = torch.tensor(rows)
    edges = [float(x) for x in a.bands.split(",")]
    bands = list(zip(edges, edges[1:]))
    if len(bands) > 1:
        bands.append((edges[0], edges[-1]))  # all of them together
    cos = torch.nn.functional.cosine_similarity
    for error in a.errors.split(","):
        for lo, hi in bands:
            g = [gap_gradient(method, policy, b, lo, hi, 2 * k, error, a.draws) for k, b in enumerate(batches)]
            g2 = [gap_gradient(method, policy, b, lo, hi, 2 * k + 1, error, a.draws) for k, b in enumerate(batches)]
            same = torch.tensor([cos(x, y, dim=0).item() for x, y in zip(g, g2)])
            other = torch.tensor([cos(g[j], g[k], dim=0).item() for j in range(len(g)) for k in range(j)])
            print(json.dumps({"model": a.model, "pairs": a.pairs, "error": error, "band": [lo, hi], "draws": a.draws,
                              "cos_same_pairs_other_noise": round(same.mean().item(), 4),
                              "cos_other_pairs": round(other.mean().item(), 4),
                              "se_other_pairs": round(other.std().item() / len(g) ** 0.5, 4),
                              "grad_norm": round(torch.stack([x.norm() for x in g]).mean().item(), 4)}), flush=True)


if __name__ == "__main__":
    main()
