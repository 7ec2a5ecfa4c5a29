"""Reference inversion trajectories kept in memory across epochs (Inversion-DPO's `inversion_cache_mb`).

The reference is frozen and DDIM inversion is deterministic, so an image's trajectory under its conditioning is
the same every time the image comes round. The cache keys each image by a digest of its latent and of its
conditioning rows (caption dropout and SDXL sizes change the key), keeps the trajectory on the CPU, and computes
only the rows it has not seen. It holds at most `max_bytes`; past that, new rows are computed every time and
counted (`uncached`), never dropped. A restarted run refills it with the same trajectories (up to the float
rounding of another batch composition).
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import Tensor

from .inversion import Trajectory


def row_digests(x0: Tensor, cond: dict[str, Tensor]) -> list[bytes]:
    """One digest per row of x0 [B, ...] and of every conditioning tensor [B, ...] (keys in sorted order)."""
    parts = [x0.detach().float().cpu()] + [cond[k].detach().float().cpu() for k in sorted(cond)]
    out = []
    for r in range(x0.shape[0]):
        h = hashlib.blake2b(digest_size=16)
        for p in parts:
            h.update(str(tuple(p.shape[1:])).encode())
            h.update(p[r].contiguous().numpy().tobytes())
        out.append(h.digest())
    return out


class TrajectoryCache:
    """Trajectories by row digest: `get(x0, cond, compute)` returns a Trajectory for all rows, calling
    `compute(rows)` (a LongTensor of row indices) for the rows not stored."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        self.max_bytes, self.bytes = int(max_bytes), 0
        self.store: dict[bytes, tuple[Tensor, Tensor]] = {}  # digest -> (xs [N, ...], eps_ref [N, ...]) on CPU
        self.ts: Tensor | None = None
        self.hits = self.misses = self.uncached = 0

    def get(self, x0: Tensor, cond: dict[str, Tensor], compute: Callable[[Tensor], Trajectory]) -> Trajectory:
        keys = row_digests(x0, cond)
        missing = [r for r, k in enumerate(keys) if k not in self.store]
        fresh: dict[int, tuple[Tensor, Tensor]] = {}
        if missing:
            traj = compute(torch.tensor(missing, dtype=torch.long, device=x0.device))
            self._check_ts(traj.ts)
            for j, r in enumerate(missing):
                # own copies: a view would keep the whole batch's trajectory alive
                xs, eps = traj.xs[:, j].detach().cpu().clone(), traj.eps_ref[:, j].detach().cpu().clone()
                fresh[r] = (xs, eps)
                size = xs.nbytes + eps.nbytes
                if keys[r] in self.store:  # the same image twice in one batch
                    continue
                if self.bytes + size <= self.max_bytes:
                    self.store[keys[r]], self.bytes = (xs, eps), self.bytes + size
                else:
                    self.uncached += 1
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        rows = [fresh[r] if r in fresh else self.store[k] for r, k in enumerate(keys)]
        xs = torch.stack([x for x, _ in rows], dim=1).to(x0.device)
        eps = torch.stack([e for _, e in rows], dim=1).to(x0.device)
        return Trajectory(xs=xs, ts=self.ts.to(x0.device), eps_ref=eps)

    def _check_ts(self, ts: Tensor) -> None:
        ts = ts.detach().cpu()
        if self.ts is None:
            self.ts = ts
        elif not torch.equal(self.ts, ts):
            raise ValueError("a cached trajectory has other timesteps than this one (inversion_steps changed?)")

    def stats(self) -> dict[str, float]:
        seen = self.hits + self.misses
        return {"traj_cache_hit_rate": self.hits / seen if seen else 0.0, "traj_cache_mb": self.bytes / 2 ** 20,
                "traj_cache_uncached": float(self.uncached)}
