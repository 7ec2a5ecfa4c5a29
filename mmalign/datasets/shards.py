"""A sharded, resumable, memory-mapped tensor cache for encodings of whole data sets (VAE posteriors, text
conditioning, pixel values), so neither encoding nor training holds the data set in memory.

Layout of an entry (`root/<fingerprint(key)[:20]>/`, the key as in `cache.py`):
- `key.json`, the full key, written first;
- `shards/<s>.safetensors`, one per range of source rows [s*N, (s+1)*N): the rows kept from that range (per-row
  tensors, first dim = rows kept), per-row tensors of varying length (token ids: `ragged.<name>.data`, all rows
  concatenated on dim 0, and `ragged.<name>.offsets` [rows + 1]), any tables they index (stored as
  `table.<name>.<tensor>`, referenced by the per-row `<name>_index`), and in the file's metadata the range's skip
  report; written to a temp file and renamed, so a present shard is complete;
- `extras.safetensors`: tensors of the whole set (e.g. the empty caption's conditioning);
- `index.json`, written last: every shard's row count and byte size, the merged skip report.

Shards are assigned round-robin to the ranks of a `torch.distributed` group (rank r encodes s ≡ r mod world); the
main rank writes the index once every rank is past a barrier. Within a rank, a pool of `num_workers` processes
reads and decodes (`prepare`) while the main process encodes (`encode`). A killed pass resumes: shards already
present and readable are kept. An index that does not match the key or its shards (torn, or a shard truncated or
missing) is rebuilt; a shard whose header cannot be read is recomputed. Running out of disk is an error naming the
cache directory; the complete shards stay. The Hugging Face `datasets` library would also store this (Arrow), but
its rows are Python lists and its cache is keyed by fingerprints of the functions; safetensors shards keep tensors
typed and memory-mapped (`safe_open`), need no conversion on read, and take our explicit key.
"""
from __future__ import annotations

import bisect
import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .cache import canonical, fingerprint
from .records import SkipReport

INDEX_VERSION = 1
TABLE = "table."
RAGGED = "ragged."


def report_from_dict(d: dict) -> SkipReport:
    r = SkipReport(total=d["total"], kept=d["kept"])
    r.skipped.update(d["skipped"])
    r.examples.update({k: list(v) for k, v in d["examples"].items()})
    return r


def merge_reports(reports: Iterable[SkipReport]) -> SkipReport:
    out = SkipReport()
    for r in reports:
        out.total += r.total
        out.kept += r.kept
        out.skipped.update(r.skipped)
        for reason, ex in r.examples.items():
            out.examples.setdefault(reason, [])
            out.examples[reason].extend(ex[:5 - len(out.examples[reason])])
    return out


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist_info()[1] > 1:
        torch.distributed.barrier()


@dataclass(frozen=True)
class Plan:
    """Source rows [0, n_rows) cut into shards of `shard_rows`."""
    n_rows: int
    shard_rows: int

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    def bounds(self, s: int) -> tuple[int, int]:
        return s * self.shard_rows, min((s + 1) * self.shard_rows, self.n_rows)


def _shard_path(entry: Path, s: int) -> Path:
    return entry / "shards" / f"{s:06d}.safetensors"


def _shard_meta(path: Path) -> dict | None:
    """The shard's metadata ({"rows", "report", "key"}) when its header reads, else None (missing or torn)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return {"rows": int(meta["rows"]), "report": json.loads(meta["report"]), "key": meta["key"]}
    except Exception:  # safetensors raises its own types for truncated or foreign files
        return None


def _no_space(e: OSError, entry: Path) -> OSError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        done = len(list((entry / "shards").glob("*.safetensors")))
        return OSError(e.errno, f"out of disk space writing the data cache in {entry.parent} ({done} complete "
                                f"shard(s) kept and reused on the next run); free space or set data.cache_dir "
                                f"elsewhere")
    return e


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], entry: Path) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _no_space(e, entry) from e


def _flatten(out: dict) -> dict[str, torch.Tensor]:
    """encode()'s {"rows": {...}, "ragged": {name: [tensor per row]}, "tables": {name: {...}}} as one flat dict
    of stored tensors."""
    flat = dict(out.get("rows", {}))
    for name, items in out.get("ragged", {}).items():
        lengths = torch.tensor([0] + [len(t) for t in items])
        flat[f"{RAGGED}{name}.offsets"] = torch.cumsum(lengths, 0)
        flat[f"{RAGGED}{name}.data"] = torch.cat(list(items))
    for name, table in out.get("tables", {}).items():
        flat.update({f"{TABLE}{name}.{k}": v for k, v in table.items()})
    seen = set()
    for k, t in flat.items():  # safetensors refuses tensors sharing memory
        t = t.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        flat[k] = t
    return flat


class _ShardTask(torch.utils.data.IterableDataset):
    """Runs `prepare` over this rank's missing shards, split over the DataLoader's workers."""

    def __init__(self, shards: list[int], plan: Plan, read, prepare):
        self.shards, self.plan, self.read, self.prepare = shards, plan, read, prepare

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for s in mine:
            report = SkipReport()
            start, stop = self.plan.bounds(s)
            yield s, self.prepare(self.read(start, stop), report), report.to_dict()


def _valid_index(entry: Path, key_fp: str) -> dict | None:
    try:
        index = json.loads((entry / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if index.get("version") != INDEX_VERSION or index.get("key") != key_fp:
        return None
    for s, size in enumerate(index["sizes"]):
        try:
            if _shard_path(entry, s).stat().st_size != size:
                return None
        except OSError:
            return None
    return index


def build_sharded(root: str | Path, key: dict, *, n_rows: int, read: Callable[[int, int], Iterable],
                  prepare: Callable[[Iterable, SkipReport], Any], encode: Callable[[Any], dict],
                  extras: Callable[[], dict[str, torch.Tensor]] | None = None, shard_rows: int = 512,
                  num_workers: int = 0, log: Callable[[str], None] = print, desc: str = "encode") -> "ShardedRows":
    """The sharded entry for `key` under `root`, encoded first where shards are missing.

    `read(start, stop)` yields the source's rows in [start, stop) (cheaply: it runs in the workers);
    `prepare(rows, report)` validates and decodes them (in a worker; skips counted in `report`, whose `kept` it
    sets) and returns something picklable; `encode(prepared)` runs on the main process of each rank (models on the
    device; never called for a range with no kept row) and returns {"rows": {name: [kept, ...]}, "ragged": {name:
    [one tensor per kept row]}, "tables": {name: {tensor: [m, ...]}}} with per-row `<table>_index` tensors; `extras()` the set-wide tensors (main rank).
    """
    root, key_fp = Path(root), fingerprint(key)
    entry = root / key_fp[:20]
    rank, world = dist_info()
    index = _valid_index(entry, key_fp)
    if index is not None:
        log(f"tensor cache hit: {entry} ({len(index['sizes'])} shards)")
        return ShardedRows(entry, index)
    plan = Plan(n_rows, shard_rows)
    if rank == 0:
        _start_entry(entry, key)
    _barrier()
    mine = [s for s in range(rank, plan.n_shards, world) if _reusable(entry, s, key_fp) is None]
    reused = len(range(rank, plan.n_shards, world)) - len(mine)
    log(f"tensor cache miss: encoding {entry}: {plan.n_shards} shard(s) of {shard_rows} source rows"
        + (f", {reused} already complete" if reused else "") + (f", rank {rank} of {world}" if world > 1 else ""))
    loader = torch.utils.data.DataLoader(_ShardTask(mine, plan, read, prepare), batch_size=None,
                                         num_workers=num_workers if len(mine) > 1 else 0)
    bar = tqdm(total=sum(plan.bounds(s)[1] - plan.bounds(s)[0] for s in mine), desc=desc, unit="row",
               disable=rank != 0)
    for s, prepared, report in loader:
        flat = _flatten(encode(prepared)) if report["kept"] else {}  # a range with no usable row: no tensors
        lengths = {len(t) for k, t in flat.items() if not k.startswith((TABLE, RAGGED)) and t.dim()}
        lengths |= {len(t) - 1 for k, t in flat.items() if k.startswith(RAGGED) and k.endswith(".offsets")}
        if len(lengths) > 1:  # rows may outnumber kept source rows (augmentation: both flips), never disagree
            raise RuntimeError(f"shard {s}: encode returned per-row tensors of different lengths {sorted(lengths)}")
        meta = {"rows": str(lengths.pop() if lengths else 0), "report": json.dumps(report), "key": key_fp}
        _atomic_save(flat, _shard_path(entry, s), meta, entry)
        bar.update(plan.bounds(s)[1] - plan.bounds(s)[0])
    bar.close()
    _barrier()
    if rank == 0:
        _write_index(entry, key_fp, plan, extras)
    _barrier()
    index = _valid_index(entry, key_fp)
    if index is None:
        raise RuntimeError(f"{entry}: the cache index is missing or does not match its shards after encoding")
    return ShardedRows(entry, index)


def _start_entry(entry: Path, key: dict) -> None:
    """Make the entry's folders and key.json; a key.json of another key (a hash prefix clash or a foreign
    folder) empties the entry first."""
    try:
        stored = json.loads((entry / "key.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stored = None
    if stored is not None and stored != json.loads(canonical(key)):
        shutil.rmtree(entry)
    (entry / "shards").mkdir(parents=True, exist_ok=True)
    (entry / "index.json").unlink(missing_ok=True)
    try:
        (entry / "key.json").write_text(json.dumps(key, sort_keys=True, indent=1, default=str), encoding="utf-8")
    except OSError as e:
        raise _no_space(e, entry) from e


def _reusable(entry: Path, s: int, key_fp: str) -> dict | None:
    """The metadata of shard `s` when it is complete and of this key; a torn or foreign one is deleted."""
    path = _shard_path(entry, s)
    if not path.exists():
        return None
    meta = _shard_meta(path)
    if meta is None or meta["key"] != key_fp:
        path.unlink(missing_ok=True)
        return None
    return meta


def _write_index(entry: Path, key_fp: str, plan: Plan, extras) -> None:
    rows, sizes, reports = [], [], []
    for s in range(plan.n_shards):
        meta = _reusable(entry, s, key_fp)
        if meta is None:
            raise RuntimeError(f"{_shard_path(entry, s)}: shard missing or unreadable after encoding")
        rows.append(meta["rows"])
        sizes.append(_shard_path(entry, s).stat().st_size)
        reports.append(report_from_dict(meta["report"]))
    if extras is not None:
        _atomic_save(extras(), entry / "extras.safetensors", {"key": key_fp}, entry)
    index = {"version": INDEX_VERSION, "key": key_fp, "rows": rows, "sizes": sizes,
             "report": merge_reports(reports).to_dict()}
    tmp = entry / f".tmp-{os.getpid()}-index.json"
    try:
        tmp.write_text(json.dumps(index), encoding="utf-8")
        os.replace(tmp, entry / "index.json")
    except OSError as e:
        raise _no_space(e, entry) from e


class ShardedRows(torch.utils.data.Dataset):
    """The rows of a complete entry, read lazily from memory-mapped shards: row i is a dict of its per-row tensors
    with every table reference (`<name>_index`) replaced by that table row's tensors. Picklable for DataLoader
    workers (open files are not carried)."""

    def __init__(self, entry: str | Path, index: dict):
        self.entry, self.index = Path(entry), index
        self.starts = [0]
        for n in index["rows"]:
            self.starts.append(self.starts[-1] + n)
        self._open: dict[int, Any] = {}
        self._layout: tuple[list[str], list[str], dict[str, list[str]]] | None = None

    @property
    def report(self) -> SkipReport:
        return report_from_dict(self.index["report"])

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}

    def _file(self, s: int):
        if s not in self._open:
            self._open[s] = safe_open(str(_shard_path(self.entry, s)), framework="pt")
        return self._open[s]

    def _keys(self, f) -> tuple[list[str], list[str], dict[str, list[str]]]:
        if self._layout is None:  # from the first shard read; a shard with rows has every key
            names = list(f.keys())
            tables: dict[str, list[str]] = {}
            for k in names:
                if k.startswith(TABLE):
                    name, tensor = k[len(TABLE):].split(".", 1)
                    tables.setdefault(name, []).append(tensor)
            ragged = [k[len(RAGGED):-len(".data")] for k in names if k.startswith(RAGGED) and k.endswith(".data")]
            self._layout = ([k for k in names if not k.startswith((TABLE, RAGGED))], ragged, tables)
        return self._layout

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        s = bisect.bisect_right(self.starts, i) - 1
        j = i - self.starts[s]
        f = self._file(s)
        per_row, ragged, tables = self._keys(f)
        row = {k: f.get_slice(k)[j:j + 1][0] for k in per_row}
        for name in ragged:
            lo, hi = f.get_slice(f"{RAGGED}{name}.offsets")[j:j + 2].tolist()
            row[name] = f.get_slice(f"{RAGGED}{name}.data")[lo:hi]
        for name, tensors in tables.items():
            t = int(row.pop(f"{name}_index"))
            row.update({k: f.get_slice(f"{TABLE}{name}.{k}")[t:t + 1][0] for k in tensors})
        return row

    def column(self, name: str) -> torch.Tensor:
        """Per-row tensor `name` of every row, concatenated over shards (small per-row values: flags, scores),
        without reading the other tensors."""
        parts = [self._file(s).get_tensor(name) for s, n in enumerate(self.index["rows"]) if n]
        return torch.cat(parts) if parts else torch.empty(0)

    def extras(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file
        path = self.entry / "extras.safetensors"
        return load_file(str(path)) if path.exists() else {}
