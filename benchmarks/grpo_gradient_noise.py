"""How many images does one GRPO update need before its gradient points somewhere? The gradient noise scale
(McCandlish et al. 2018, "An empirical model of large-batch training") of the shipped GRPO recipe at the base.

M independent rollouts (fresh prompts and noise each, as training draws them) give M gradients g_k of the
clipped-ratio loss at ratio 1, each over b images (batch_size x group_size). The KL term's gradient is 0 at the
reference, so g_k = -mean_i A_i grad log p(trained steps of i) is exactly the training's first-step gradient.
With G the true gradient and S the per-image covariance, E|g_k|^2 = |G|^2 + tr(S)/b and the mean of M of them
has E|g_bar|^2 = |G|^2 + tr(S)/(M b), so

    |G|^2 = (M |g_bar|^2 - mean_k |g_k|^2) / (M - 1),   tr(S) = b (mean_k |g_k|^2 - |G|^2),
    B_noise = tr(S) / |G|^2   (images per update at which the gradient's noise equals its signal);

at b images a step's expected cosine with G is about sqrt(b / (b + B_noise)). CIs: bootstrap over the M rollouts
(from their Gram matrix; a G estimate <= 0 counts as B_noise infinite). Also the mean cosine between two rollouts'
gradients, as benchmarks/dpo_gradient_coherence.py reports for DPO.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grpo_gradient_noise.py --rollouts 16 [override ...]

Overrides are `mmalign train` ones on configs/shapeworld_diffusion_grpo.yaml (e.g. objective.group_size=16,
model.pretrained=runs/grpo/r3/export-step-150).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from mmalign.core.config import load_experiment
from mmalign.core.registry import method_class
from mmalign.core.stats import gradient_noise_scale
from mmalign.diffusion.grpo_losses import grpo_loss


def rollout_gradient(method, policy, prompt_rows: list[int], seed: int) -> tuple[torch.Tensor, dict]:
    """The flattened gradient of one rollout's loss at ratio 1 (every trajectory of the rollout in one pass)."""
    batch = {"index": torch.tensor(prompt_rows), "row_seed": torch.tensor([seed * 1000 + r for r in prompt_rows])}
    metrics = method.rollout(policy, batch)
    sel = torch.arange(len(method.adv))
    lp, _, _, _ = method.recompute(policy, sel)
    old = method.traj.log_probs[sel][:, method.steps].to(lp)
    loss, _ = grpo_loss(lp, old, method.adv[sel], method.cfg.objective.clip_range)
    policy.zero_grad()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
    return grad, {"reward_mean": float(metrics["reward_mean"]), "zero_adv_share": float(metrics["zero_adv_share"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--config", default="configs/shapeworld_diffusion_grpo.yaml")
    ap.add_argument("--rollouts", type=int, default=16, help="M independent rollouts")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = tempfile.mkdtemp(prefix="grpo_noise_")
    exp = load_experiment(a.config, a.overrides, lambda name: method_class(name).config_class)
    method = method_class(exp.method)(exp.args, out)
    policy = method.build(torch.device("cpu"))
    rows, _ = method.dataset()
    per = exp.train.batch_size
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(a.seed)).tolist()
    if len(order) < per * a.rollouts:
        raise SystemExit(f"{len(order)} prompts, {per * a.rollouts} needed")
    grads, info, t0 = [], [], time.time()
    for k in range(a.rollouts):
        g, m = rollout_gradient(method, policy, order[per * k:per * (k + 1)], a.seed * 100 + k)
        grads.append(g)
        info.append(m)
    g = torch.stack(grads).double()
    gram = g @ g.T
    b = per * method.cfg.objective.group_size
    est = gradient_noise_scale(gram, b)
    gen = torch.Generator().manual_seed(1)
    boots = []
    for _ in range(a.boot):
        i = torch.randint(0, len(g), (len(g),), generator=gen)
        if len(set(i.tolist())) > 1:
            boots.append(gradient_noise_scale(gram, b, i)["B_noise"])
    boots = torch.tensor(boots)
    finite = boots[boots.isfinite()]
    # quantiles over all draws, infinity ranking last: an upper bound of inf means the signal is not resolved
    q = torch.quantile(torch.where(boots.isfinite(), boots, torch.tensor(float("1e300"))).double(),
                       torch.tensor([0.025, 0.975], dtype=torch.float64))
    lo, hi = (x.item() if x < 1e299 else float("inf") for x in q)
    print(json.dumps({"config": a.config, "overrides": a.overrides, "rollouts": a.rollouts, "images_per_rollout": b,
                      "params": g.shape[1], **{k: round(v, 6) for k, v in est.items()},
                      "B_noise_ci95": [round(lo, 1), round(hi, 1)],
                      "B_noise_infinite_share": round(1 - len(finite) / max(len(boots), 1), 3),
                      "expected_cos_at_b": round((b / (b + est["B_noise"])) ** 0.5, 4) if est["G2"] > 0 else 0.0,
                      "reward_mean": round(sum(x["reward_mean"] for x in info) / len(info), 4),
                      "zero_adv_share": round(sum(x["zero_adv_share"] for x in info) / len(info), 4),
                      "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
