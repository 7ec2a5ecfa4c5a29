"""The MLLM training rows (DPO pairs, SFT conversations) encoded once into the sharded, memory-mapped cache of
`datasets.shards`, so neither encoding nor training holds the data set (pixel values: 1.35 MB per 336 px image in
fp32) in memory.

Per shard of source rows, a worker validates the raw rows (`vl_records.PairReader` / `ConversationReader`),
decodes the images and runs the processor and tokenizer (`data.Encoder`), and packs the kept rows into a few
tensors; the main process only writes them. Stored per row (ragged = varying length, concatenated over rows):
- pairs: `margin` (float64), `packable` (int8: `packing.pair_packable` found nothing), `chosen.ids` / `.mask`
  (and `.tok.<k>`, per-token side inputs), the same for `rejected`, the prompt's image inputs once as `img.<k>`
  (flattened) with `img.<k>.shape`; mDPO adds `cropped.*` and `cropped.img.*`;
- conversations: `ids`, `mask`, `tok.<k>`, `img.<k>` and `img.<k>.shape`.
Flattened image inputs with their shape take any layout: LLaVA-1.5's [images, 3, H, W], LLaVA-NeXT's varying
tile counts, Qwen2-VL's patch rows. Row i reads back as the same `EncodedPair` (index = i, the dataset row) or
`Encoded` the in-memory encoder gives, so collate and loss see the same tensors.
"""
from __future__ import annotations

import os
from pathlib import Path
import torch

from ..datasets.cache import file_fingerprint, files_fingerprint, model_fingerprint
from ..datasets.records import SkipReport
from ..datasets.shards import ShardedRows, build_sharded
from .data import Encoder, EncodedPair
from .encoding import Encoded

VERSION = 1


# ---- one encoded row <-> tensors ----

def _side(prefix: str, enc: Encoded) -> dict[str, torch.Tensor]:
    out = {f"{prefix}ids": torch.tensor(enc.ids, dtype=torch.int32),
           f"{prefix}mask": torch.tensor(enc.train_mask, dtype=torch.int8)}
    out.update({f"{prefix}tok.{k}": torch.tensor(v, dtype=torch.int64) for k, v in enc.token_inputs.items()})
    return out


def _images(prefix: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, t in inputs.items():
        out[f"{prefix}img.{k}"] = t.reshape(-1)
        out[f"{prefix}img.{k}.shape"] = torch.tensor(t.shape, dtype=torch.int64)
    return out


def pair_row(p: EncodedPair) -> dict[str, torch.Tensor]:
    from .packing import pair_packable

    if p.chosen.image_inputs is not p.rejected.image_inputs:  # Encoder.pair shares the prompt's
        raise RuntimeError("chosen and rejected do not share their prompt's image inputs")
    row = {"margin": torch.tensor(p.margin, dtype=torch.float64),
           "packable": torch.tensor(pair_packable(p.chosen, p.rejected) is None, dtype=torch.int8),
           **_side("chosen.", p.chosen), **_side("rejected.", p.rejected), **_images("", p.chosen.image_inputs)}
    if p.cropped is not None:
        row.update({**_side("cropped.", p.cropped), **_images("cropped.", p.cropped.image_inputs)})
    return row


def conversation_row(enc: Encoded) -> dict[str, torch.Tensor]:
    return {**_side("", enc), **_images("", enc.image_inputs)}


def _read_images(row: dict, prefix: str) -> dict[str, torch.Tensor]:
    head = f"{prefix}img."
    return {k[len(head):]: row[k].reshape(row[f"{k}.shape"].tolist())
            for k in row if k.startswith(head) and not k.endswith(".shape")}


def _read_side(row: dict, prefix: str, images: dict) -> Encoded:
    head = f"{prefix}tok."
    return Encoded(row[f"{prefix}ids"].tolist(), row[f"{prefix}mask"].tolist(), images,
                   {k[len(head):]: row[k].tolist() for k in row if k.startswith(head)})


def read_pair(i: int, row: dict) -> EncodedPair:
    images = _read_images(row, "")
    out = EncodedPair(i, _read_side(row, "chosen.", images), _read_side(row, "rejected.", images),
                      margin=float(row["margin"]))
    if "cropped.ids" in row:
        out.cropped = _read_side(row, "cropped.", _read_images(row, "cropped."))
    return out


def read_conversation(row: dict) -> Encoded:
    return _read_side(row, "", _read_images(row, ""))


def _pack(rows: list[dict[str, torch.Tensor]]) -> dict:
    """Kept rows as a few tensors (cheap to hand from a worker): scalars stacked, the rest concatenated with
    their lengths."""
    keys = rows[0].keys()
    for r in rows:
        if r.keys() != keys:
            raise RuntimeError(f"encoded rows differ in their inputs: {sorted(keys ^ r.keys())} (the processor "
                               f"returned different side inputs for different rows)")
    out: dict = {"rows": {}, "ragged": {}}
    for k in keys:
        ts = [r[k] for r in rows]
        if ts[0].dim() == 0:
            out["rows"][k] = torch.stack(ts)
        else:
            out["ragged"][k] = (torch.cat(ts), [len(t) for t in ts])
    return out


def _unpack(packed: dict) -> dict:
    return {"rows": packed["rows"],
            "ragged": {k: list(torch.split(d, lengths)) for k, (d, lengths) in packed["ragged"].items()}}


# ---- shard work (picklable: runs in DataLoader workers) ----

class _Read:
    def __init__(self, source):
        self.source = source

    def __call__(self, start: int, stop: int):
        return enumerate(self.source.rows(start, stop), start)  # (source row, (where, row, base))


class _Prepare:
    """Validate, decode and encode one shard's raw rows; skips counted in the shard's report."""

    def __init__(self, kind: str, reader, processor, model_config, max_length, bad_rows: str, crop, steer):
        self.kind, self.reader, self.processor, self.model_config = kind, reader, processor, model_config
        self.max_length, self.bad_rows, self.crop, self.steer = max_length, bad_rows, crop, steer

    def __call__(self, items, report: SkipReport):
        from ..datasets.vl_records import load_images

        ctx = self.reader.new_ctx()
        enc = Encoder(self.processor, self.model_config, self.max_length, self.bad_rows, report)
        rows = []
        for n, item in items:
            for k, rec in enumerate(self.reader.row(item, report, ctx)):
                row = self._one(enc, n, k, rec, load_images(rec))
                if row is not None:
                    rows.append(row)
        report.kept = len(rows)
        return _pack(rows) if rows else None

    def _one(self, enc: Encoder, n: int, k: int, rec, images: list):
        if self.kind == "pairs":  # the crop is seeded by the source row (and the pair within it)
            p = enc.pair(n, rec, images, self.crop, crop_key=n if k == 0 else f"{n}.{k}")
            return None if p is None else pair_row(p)
        where = rec.where or f"conversation {n}"
        msgs = rec.messages
        if self.steer:
            from .sft import steer_messages
            try:
                msgs = steer_messages(rec.messages, rec.meta.get("attributes", {}), self.steer)
            except ValueError as e:
                enc.skip(e, where)
                return None
        e = enc.conversation(n, msgs, images, where)
        return None if e is None else conversation_row(e)


# ---- the dataset ----

class EncodedRows(torch.utils.data.Dataset):
    """Row i of the cache as an `EncodedPair` (index i) or an `Encoded`, read lazily."""

    def __init__(self, rows: ShardedRows, kind: str):
        self.rows, self.kind = rows, kind

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        return read_pair(i, row) if self.kind == "pairs" else read_conversation(row)

    @property
    def report(self) -> SkipReport:
        return self.rows.report

    def packable(self) -> torch.Tensor:
        """Per pair, 1 when `packing.pair_packable` allows it (read without the pixel values)."""
        return self.rows.column("packable")


def data_fingerprint(path: str, columns: tuple[str, ...], image_root: str, jsonl_names) -> dict:
    """The data file or folder and every image file its rows name (a hub id: by name)."""
    from ..datasets.vl_records import referenced_image_files

    if not Path(path).exists():
        return {"path": path}
    return {"path": str(Path(path).resolve()), "files": file_fingerprint(path),
            "images": files_fingerprint(referenced_image_files(path, columns, image_root or None, jsonl_names))}


def encode_rows(kind: str, d, pretrained: str, processor, model_config, output_dir: str, crop=None,
                steer: list[str] | None = None, log=print) -> tuple[EncodedRows, dict]:
    """(dataset, cache key) for the data config `d` (VLPairDataConfig / VLConversationDataConfig): encoded
    into `d.cache_dir`, or `<output_dir>/data_cache` when that is empty."""
    from ..core.config import ConfigError
    from ..datasets.vl_records import (IMAGE_COLS, ConversationReader, PairReader, vl_source_rows, pair_reader)

    Encoder(processor, model_config, d.max_length or None, d.bad_rows, SkipReport())  # config errors, here
    if kind == "pairs":
        source = vl_source_rows(d.path, PairReader.jsonl_names, by_range=True)
        _, reader = pair_reader(source.rows(), d.format, ties=d.ties, bad_rows=d.bad_rows,
                                image_root=d.image_root or None)
        columns, names = IMAGE_COLS[reader.format], PairReader.jsonl_names
    else:
        source = vl_source_rows(d.path, ConversationReader.jsonl_names, by_range=True)
        reader = ConversationReader(bad_rows=d.bad_rows, image_root=d.image_root or None)
        columns, names = ("images", "image"), ConversationReader.jsonl_names
    key = {"version": VERSION, "kind": f"mllm_{kind}", "model": model_fingerprint(pretrained, [""]),
           "data": data_fingerprint(d.path, columns, d.image_root, names),
           "reader": {"class": type(reader).__name__, **{k: str(v) for k, v in vars(reader).items()}},
           "max_length": d.max_length, "crops": list(crop[1:]) if crop else None, "steer": list(steer or []),
           "shard_rows": d.shard_rows}
    root = d.cache_dir or os.path.join(output_dir, "data_cache")
    if not d.cache_dir:
        log(f"data.cache_dir is empty: encoding into {root} (set data.cache_dir to share it between runs)")
    prepare = _Prepare(kind, reader, processor, model_config, d.max_length or None, d.bad_rows, crop, steer)
    rows = build_sharded(root, key, n_rows=len(source), read=_Read(source), prepare=prepare,
                         encode=_unpack, shard_rows=d.shard_rows, num_workers=d.encode_workers, log=log,
                         desc=f"encode {kind}")
    dataset = EncodedRows(rows, kind)
    if not len(dataset):
        raise ConfigError(f"data.path: no usable {kind} in {d.path} ({dataset.report.summary()})")
    return dataset, key
