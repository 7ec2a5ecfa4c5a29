"""Per-row randomness: every random draw that belongs to a training row comes from a generator keyed by
(seed, epoch, dataset row index) and the draw's name, never from a process's global RNG.

Why. With the global RNG, rank r of a DDP run draws its rows' noise from rank r's stream, so a 2-process run,
a 1-process run and a run with gradient accumulation train on different noise. Keyed per row, a row's timestep,
noise, posterior sample, caption dropout and flip view depend only on (seed, epoch, row, name): the same in every
layout (batch b x accumulation k, k processes, a resumed run), whatever the batch's other rows or their order.

How. A method opts in with the class attribute `wants_row_seed = True`. The trainer then asks its
`StepBatchSampler` for (epoch, index) keys, wraps the dataset in `SeededRows` (key -> (row seed, row)) and the
method's collate in `SeededCollate` (adds `batch["row_seed"]`, a LongTensor [B]); the method's own `collate` is
unchanged. In `loss`, `RowRandom.of(batch)` draws per row: row i's values come from a CPU `torch.Generator`
seeded by mix(row_seed[i], name), stacked and moved to the device (CPU draws: the same numbers on CPU and GPU).
A name is one draw: drawing it twice from one `RowRandom` is an error (it would repeat the same numbers).

Fallback. A batch without `row_seed` (a unit test calling `method.loss` directly, or a method that did not opt
in) draws from the global torch RNG on the target device, exactly as `torch.randn`/`rand`/`randint` would:
reproducible under `torch.manual_seed`, but not invariant to the batch layout.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch

_M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One splitmix64 step (Steele et al. 2014): a bijective, well-mixing map of 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix(*parts: int) -> int:
    """A hash of integers (any sign, taken mod 2^64) into [0, 2^63): fits int64 tensors and manual_seed."""
    h = 0
    for p in parts:
        h = splitmix64(h ^ (int(p) & _M64))
    return h >> 1


def name_key(name: str) -> int:
    """A stable 64-bit key of a draw's name (the same in every process and Python run, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def row_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of dataset row `index` in epoch `epoch` of a run seeded `seed`."""
    return mix(seed, epoch, index)


def wants_row_seed(method) -> bool:
    """Whether the trainer should attach `row_seed` to the method's batches (class attribute `wants_row_seed`)."""
    return bool(getattr(method, "wants_row_seed", False))


class SeededRows(torch.utils.data.Dataset):
    """dataset[(epoch, i)] -> (row_seed(seed, epoch, i), dataset[i]); fed by StepBatchSampler(with_epoch=True)."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        return row_seed(self.seed, epoch, i), self.dataset[i]


class SeededCollate:
    """The method's collate over the rows, plus `row_seed` (LongTensor [B]) in the batch dict it returns."""

    def __init__(self, collate: Callable[[list], dict]):
        self.collate = collate

    def __call__(self, items: Sequence[tuple[int, object]]) -> dict:
        seeds, rows = zip(*items)
        batch = self.collate(list(rows))
        if not isinstance(batch, dict) or "row_seed" in batch:
            raise TypeError("a method with wants_row_seed must collate into a dict without a 'row_seed' key")
        batch["row_seed"] = torch.tensor(seeds, dtype=torch.long)
        return batch


class RowRandom:
    """Random draws for the n rows of one batch, each draw named; values have shape [n, *shape].

    Built by `RowRandom.of(batch)`: keyed by `batch["row_seed"]` when present, else the global-RNG fallback
    (module docstring). Use one object per `loss` call and a distinct name per draw."""

    def __init__(self, n: int, seeds: Sequence[int] | None = None):
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"{len(seeds)} row seeds for {n} rows")
        self.n, self.seeds, self.used = n, None if seeds is None else [int(s) for s in seeds], set()

    @classmethod
    def of(cls, batch: dict, n: int | None = None) -> "RowRandom":
        """From a batch dict: its `row_seed`, else the fallback for `n` rows (default: the first tensor's length)."""
        seeds = batch.get("row_seed")
        if seeds is not None:
            return cls(len(seeds), seeds.tolist())
        if n is None:
            n = len(next(v for v in batch.values() if torch.is_tensor(v)))
        return cls(n)

    @property
    def keyed(self) -> bool:
        """True when draws come from the row seeds, False in the global-RNG fallback."""
        return self.seeds is not None

    def _draw(self, name: str, fallback: Callable[[tuple], torch.Tensor], per_row: Callable[[torch.Generator],
              torch.Tensor], shape: tuple, device) -> torch.Tensor:
        if name in self.used:
            raise ValueError(f"random draw {name!r} made twice for one batch (it would repeat the same numbers)")
        self.used.add(name)
        if self.seeds is None:
            return fallback((self.n, *shape))
        key, gen = name_key(name), torch.Generator()
        out = torch.stack([per_row(gen.manual_seed(mix(s, key))) for s in self.seeds])
        return out.to(device)

    def randn(self, name: str, shape: Sequence[int] = (), device=None, dtype=torch.float32) -> torch.Tensor:
        """Standard normal [n, *shape] (drawn in fp32 per row, then cast to `dtype`)."""
        shape = tuple(shape)
        return self._draw(name, lambda s: torch.randn(s, device=device, dtype=dtype),
                          lambda g: torch.randn(shape, generator=g), shape, device).to(dtype)

    def rand(self, name: str, device=None, shape: Sequence[int] = ()) -> torch.Tensor:
        """Uniform on [0, 1), fp32, [n, *shape]."""
        shape = tuple(shape)
        return self._draw(name, lambda s: torch.rand(s, device=device),
                          lambda g: torch.rand(shape, generator=g), shape, device)

    def randint(self, name: str, low: int, high: int, device=None, shape: Sequence[int] = ()) -> torch.Tensor:
        """Uniform integers in [low, high), int64, [n, *shape]."""
        shape = tuple(shape)
        return self._draw(name, lambda s: torch.randint(low, high, s, device=device),
                          lambda g: torch.randint(low, high, shape, generator=g), shape, device)


def split_pairs(x: torch.Tensor) -> torch.Tensor:
    """[n, 2, ...] (two draws per row) -> [2n, ...] as [every row's first; every row's second] (winners; losers)."""
    return x.transpose(0, 1).flatten(0, 1)
