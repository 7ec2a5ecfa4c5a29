"""The video methods' datasets (`dataset()` of mmalign.video.methods): clips encoded once into the sharded cache
(`clips.encode_sharded`), read lazily from memory-mapped shards, so memory does not grow with the clips.

The cache lives in `data.cache_dir`, or `<output_dir>/data_cache` when that is "" (a resumed run finds it
there). Its key names the VAE / text encoder (`cache.model_fingerprint`), the data (the source file or folder,
and every file its rows name, by size and mtime; ShapeWorld: count and seed), the frame sampling, the resolution,
the row policies and `shard_rows`. In-memory data (`method.data`) stays in memory (`clips.TensorRows`).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from ..core.config import ConfigError
from ..datasets.cache import file_fingerprint, files_fingerprint, model_fingerprint
from ..datasets.records import SkipReport
from ..diffusion.pipeline import encode_prompts
from .clips import (ShapeWorldClips, TensorRows, clip_folder_source, encode_clips, encode_sharded, prepare_folder,
                    prepare_pairs, prepare_shapeworld, referenced_clips)

CACHE_VERSION = 1
STRIDE, START = 1, 0  # frame sampling of clips read from files (read_video's stride and first frame)


def cache_root(method) -> str:
    return method.cfg.data.cache_dir or os.path.join(method.output_dir, "data_cache")


def data_fingerprint(path: str, referenced) -> dict:
    """A local source: its resolved path, its file(s) and the files its rows name; else (a hub id) its name."""
    if not Path(path).exists():
        return {"path": path}
    return {"path": str(Path(path).resolve()), "files": file_fingerprint(path),
            "references": files_fingerprint(referenced(path))}


def cache_key(method, kind: str, data: dict, **more) -> dict:
    d, p = method.cfg.data, method.parts
    return {"version": CACHE_VERSION, "kind": kind,
            "model": model_fingerprint(p.source, ["vae", "text_encoder", "tokenizer"]),
            "dtypes": [str(p.vae.dtype), str(p.text_encoder.dtype)], "data": data,
            "num_frames": d.num_frames, "stride": STRIDE, "start": START, "resolution": method.resolution,
            "bad_rows": d.bad_rows, "shard_rows": d.shard_rows, **more,
            **({"text_encoder": model_fingerprint(method.text_source, ["text_encoder"])} if method.text_source else {})}


def _encode(method, key: dict, source, prepare, sides: tuple, desc: str):
    d = method.cfg.data
    text = lambda captions: encode_prompts(method.parts, captions, method.device)["ctx"]  # noqa: E731
    rows = encode_sharded(cache_root(method), key, n_rows=len(source), read=source.rows, prepare=prepare,
                          vae=method.parts.vae, text=text, sides=sides, resolution=method.resolution,
                          device=method.device, batch=d.encode_batch, num_frames=d.num_frames,
                          shard_rows=d.shard_rows, num_workers=d.encode_workers, desc=desc)
    method.empty = {"ctx": rows.extras()["empty_ctx"]}
    return rows, rows.report


def temporal_dataset(method):
    """(caption, clip) rows {mean, std, ctx} of a clip folder, ShapeWorld clips or in-memory data."""
    d, res = method.cfg.data, method.resolution  # the resolution is checked before anything decodes
    if method.data is not None:
        clips, report = list(method.data), SkipReport(total=len(method.data), kept=len(method.data))
        method.require_rows(report, "in-memory data")
        mean, std = encode_clips(method.parts.vae, [f for _, f in clips], res, method.device, d.encode_batch,
                                 d.num_frames)
        return TensorRows(mean=mean, std=std, ctx=method.encode_captions([c for c, _ in clips])), report
    if d.path:
        source = clip_folder_source(d.path)
        key = cache_key(method, "video_clips", data_fingerprint(d.path, referenced_clips))
        prepare = functools.partial(prepare_folder, resolution=res, num_frames=d.num_frames, bad_rows=d.bad_rows)
    elif d.shapeworld_clips:
        source = ShapeWorldClips(d.shapeworld_clips, d.seed, d.num_frames, res)
        key = cache_key(method, "shapeworld_clips", {"shapeworld_clips": d.shapeworld_clips, "seed": d.seed})
        prepare = functools.partial(prepare_shapeworld, resolution=res)
    else:
        raise ConfigError("data: set data.path or data.shapeworld_clips")
    rows, report = _encode(method, key, source, prepare, ("",), "encode clips")
    method.require_rows(report, d.path or "data.shapeworld_clips")
    return rows, report


def pair_dataset(method):
    """(caption, preferred clip, rejected) rows {mean_w, std_w, mean_l, std_l, ctx} of `data.path`
    (`datasets.video.read_video_pairs`' rules) or in-memory data."""
    from ..datasets.video import pair_source, referenced_videos

    d, res = method.cfg.data, method.resolution  # the resolution is checked before anything decodes
    if method.data is not None:
        pairs, report = list(method.data), SkipReport(total=len(method.data), kept=len(method.data))
        method.require_rows(report, "in-memory data")
        enc = lambda k: encode_clips(method.parts.vae, [p[k] for p in pairs], res,  # noqa: E731
                                     method.device, d.encode_batch, d.num_frames)
        (mw, sw), (ml, sl) = enc(1), enc(2)
        return TensorRows(mean_w=mw, std_w=sw, mean_l=ml, std_l=sl,
                          ctx=method.encode_captions([p[0] for p in pairs])), report
    if not d.path:
        raise ConfigError("data.path: video_dpo needs pairs (or in-memory data)")
    source = pair_source(d.path)
    key = cache_key(method, "video_pairs", data_fingerprint(d.path, referenced_videos), ties=d.ties)
    prepare = functools.partial(prepare_pairs, resolution=res, n_frames=d.num_frames, stride=STRIDE, start=START,
                                bad_rows=d.bad_rows, ties=d.ties)
    rows, report = _encode(method, key, source, prepare, ("_w", "_l"), "encode video pairs")
    method.require_rows(report, d.path)
    return rows, report
