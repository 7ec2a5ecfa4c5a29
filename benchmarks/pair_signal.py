"""How much preference signal a trained model's per-image rewards carry, paired (Diffusion-DPO: winner and loser
share t and noise) against unpaired (BCO/KTO: each image its own t and noise).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pair_signal.py --model RUN/final --pairs PAIRS_DIR --n 256

For each pair, the reward of an image is r = err_ref - err_model (the denoising-error gap to the base, the
quantity both objectives push on; beta left out), at --draws draws of (t, noise). Reported: the mean rewards of
winners and losers, the mean margin E[r_w - r_l] (the signal a trained model has learnt), and its signal-to-noise
ratio per pair-draw under shared and under independent (t, noise): mean / std of r_w - r_l. A ratio well below
the paired one means an unpaired objective sees the preference through more noise at the same data.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from mmalign.diffusion.losses import per_sample_mse
from mmalign.diffusion.pipeline import denoise, encode_prompts, load_sd_components, preprocess


def errors(unet, sched, x0, cond, t, noise) -> torch.Tensor:
    return per_sample_mse(denoise(unet, sched.add_noise(x0, noise, t), t, cond), noise)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--base", default="mmalign/assets/shapeworld_sd")
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    base, model = load_sd_components(a.base), load_sd_components(a.model)
    if base.noise_scheduler.config.prediction_type != "epsilon":
        raise SystemExit("this measurement assumes an epsilon-prediction base")
    rows = [json.loads(x) for x in (Path(a.pairs) / "metadata.jsonl").read_text().splitlines()][:a.n]

    def latents(winners: bool):  # posterior means of the winners' (or losers') images
        pick = lambda r: "jpg_0" if (r["label_0"] == 1) == winners else "jpg_1"  # noqa: E731
        px = torch.stack([preprocess(Image.open(Path(a.pairs) / r[pick(r)]), base.resolution)[0] for r in rows])
        return base.vae.encode(px).latent_dist.mean * base.vae.config.scaling_factor
    x_w, x_l = latents(True), latents(False)
    cond = encode_prompts(base, [r["caption"] for r in rows], "cpu")
    sched, n, g = base.noise_scheduler, len(rows), torch.Generator().manual_seed(0)
    margins, rewards = {"shared": [], "independent": []}, {"w": [], "l": []}
    for _ in range(a.draws):
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=g)
        t2 = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=g)
        e, e2 = torch.randn(x_w.shape, generator=g), torch.randn(x_w.shape, generator=g)
        r = {}
        for name, x, tt, ee in (("w", x_w, t, e), ("l_shared", x_l, t, e), ("l_indep", x_l, t2, e2)):
            r[name] = errors(base.unet, sched, x, cond, tt, ee) - errors(model.unet, sched, x, cond, tt, ee)
        rewards["w"].append(r["w"])
        rewards["l"].append(r["l_shared"])
        margins["shared"].append(r["w"] - r["l_shared"])
        margins["independent"].append(r["w"] - r["l_indep"])
    out = {"model": a.model, "pairs": n, "draws": a.draws}
    for k, v in margins.items():
        m = torch.cat(v)
        out[k] = {"mean_margin": m.mean().item(), "std": m.std().item(), "snr": (m.mean() / m.std()).item(),
                  "share_positive": (m > 0).float().mean().item()}
    out.update({f"mean_reward_{k}": torch.cat(v).mean().item() for k, v in rewards.items()})
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
