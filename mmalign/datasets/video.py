"""Videos as frames, and video preference pairs read row by row under an explicit bad-row policy.

`read_video` takes an mp4/webm/mov/mkv/avi file (decoded with PyAV, `pip install av`), a GIF (Pillow), a folder
of frame images (sorted naturally: frame2 before frame10) or frames in memory (a uint8 (F, H, W, 3) array, or a
list of PIL images / (H, W, 3) arrays), and samples frames start, start+stride, ... (n_frames of them, or all).

Untrusted files: frames are sampled before they are decoded or copied. A GIF's timeline is computed from its frame
durations (read from the file's blocks, no pixels decoded) and only the source frames the sampled timeline
indices map to are kept; a container is decoded up to the last sampled frame and only the sampled frames kept; a
frame folder opens only the sampled files. A clip read from a file may hold at most MAX_FRAMES frames and
MAX_PIXELS pixels (frames x height x width), checked before the frames are decoded: beyond that it is a
`VideoError` "video too long" / "video too large" (a counted skip for the pair readers under bad_rows="skip").
A frame over Pillow's decompression-bomb limit (kept on) is "image too large".

GIF timing: Pillow merges identical consecutive frames when it writes a GIF and adds up their durations. A GIF
whose frame durations are all whole multiples of the shortest one is therefore read on that shortest duration's
timeline (a frame shown twice as long counts twice), which restores the merged frames; other GIFs are read frame
by frame (`gif_timeline=False` always does that).

Pair rows (jsonl, csv, a folder with metadata.jsonl, or anything `mmalign.datasets.pairs` reads): `caption` with
either `video_w`, `video_l` (preferred, rejected) or the Pick-a-Pic-like `video_0`, `video_1`, `label_0` (1: video_0
preferred, 0: video_1 preferred, 0.5: a tie, handled as in `pairs.py`). Videos are paths relative to `video_root`,
else to the source file's folder. A bad row is a counted skip with its reason or a `DataError` naming file:line.
"""
from __future__ import annotations

import bisect
import csv
import itertools
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from .pairs import BadRow, captioned_rows, check_ties, pair_label, tie_left_out, write_pair_folder
from .records import IMAGE_ERRORS, DataError, SkipReport, check_policy, image_reason, reject

CONTAINER_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MAX_FRAMES = 1024  # frames per clip read from a file ("video too long" beyond)
MAX_PIXELS = 2 ** 27  # frames x height x width per clip read from a file, ~400 MB as uint8 RGB ("video too large")
_NATIVE, _LABELLED = ("video_w", "video_l"), ("video_0", "video_1")
_CORE = ("caption", *_NATIVE, *_LABELLED, "label_0")


class VideoError(DataError):
    """A video that cannot give the frames asked for; `reason` is the short category a skip report counts."""

    def __init__(self, where: Any, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{where}: {reason}" + (f" ({detail})" if detail else ""))


def natural_key(name: str) -> list:
    """Sort key reading digit runs as numbers: frame2 < frame10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _check_sampling(n_frames: int | None, stride: int, start: int) -> None:
    if (n_frames is not None and n_frames < 1) or stride < 1 or start < 0:
        raise ValueError(f"sampling needs n_frames >= 1 (or None), stride >= 1, start >= 0; "
                         f"got n_frames={n_frames}, stride={stride}, start={start}")


def _frames_needed(n_frames: int | None, stride: int, start: int) -> int | None:
    """How many leading frames the sampling reads (None: all)."""
    return None if n_frames is None else start + (n_frames - 1) * stride + 1


def _sample(total: int, n_frames: int | None, stride: int, start: int, where: Any) -> range:
    need = _frames_needed(n_frames, stride, start)
    if total <= start or (need is not None and total < need):
        raise VideoError(where, "video too short", f"{total} frame(s); start={start}, stride={stride}, "
                         f"n_frames={n_frames} needs {need if need is not None else start + 1}")
    return range(start, total if need is None else need, stride)


def _check_clip(n: int, size: tuple[int, int] | None, where: Any) -> None:
    """Refuse a clip of n frames of `size` (width, height; None: not known yet) over MAX_FRAMES or MAX_PIXELS."""
    if n > MAX_FRAMES:
        raise VideoError(where, "video too long", f"{n} frames asked for, at most MAX_FRAMES={MAX_FRAMES} per clip; "
                         "sample fewer with n_frames / stride")
    if size is not None and n * size[0] * size[1] > MAX_PIXELS:
        raise VideoError(where, "video too large", f"{n} frames of {size[0]}x{size[1]} = {n * size[0] * size[1]} "
                         f"pixels, at most MAX_PIXELS={MAX_PIXELS} per clip")


def _check_sizes(frames: list[np.ndarray], names: list[Any]) -> None:
    first = frames[0].shape
    for f, name in zip(frames, names):
        if f.shape != first:
            raise VideoError(name, "mixed frame sizes", f"{f.shape[1]}x{f.shape[0]} but {names[0]} is "
                             f"{first[1]}x{first[0]}")


def _in_memory(frames: Any) -> list[np.ndarray]:
    where = "<frames in memory>"
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise VideoError(where, "bad frame array", f"expected (F, H, W, 3), got shape {frames.shape}")
        frames = list(frames)
    frames = [np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f) for f in frames]
    if not frames:
        raise VideoError(where, "no frames")
    for i, f in enumerate(frames):
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[-1] != 3:
            raise VideoError(where, "bad frame array", f"frame {i}: expected uint8 (H, W, 3), got {f.dtype} "
                             f"{f.shape}")
    _check_sizes(frames, [f"{where} frame {i}" for i in range(len(frames))])
    return frames


def _sub_blocks(f) -> Iterator[bytes]:
    """A GIF's data sub-blocks, up to the block terminator."""
    while (n := f.read(1)) and n[0]:
        yield f.read(n[0])


def _gif_durations(path: Path) -> list[int]:
    """Each frame's duration in ms (0 without one), read from the GIF's blocks as Pillow reads them, no pixels
    decoded."""
    out, duration = [], 0
    with open(path, "rb") as f:
        head = f.read(13)
        if len(head) == 13 and head[10] & 0x80:  # global colour table
            f.seek(3 << ((head[10] & 7) + 1), 1)
        while (tag := f.read(1)) not in (b"", b";"):
            if tag == b"!":  # extension: a graphic control block holds the next frame's delay in 1/100 s
                label, blocks = f.read(1), _sub_blocks(f)
                first = next(blocks, None)
                if label == b"\xf9" and first is not None and len(first) >= 3:
                    duration = (first[1] | first[2] << 8) * 10
                for _ in blocks:
                    pass
            elif tag == b",":  # image: descriptor, local colour table, LZW code size, data
                desc = f.read(9)
                if len(desc) < 9:
                    break
                if desc[8] & 0x80:
                    f.seek(3 << ((desc[8] & 7) + 1), 1)
                f.read(1)
                for _ in _sub_blocks(f):
                    pass
                out.append(duration)
                duration = 0
    return out


def _gif_frames(path: Path, n_frames: int | None, stride: int, start: int, timeline: bool) -> list[np.ndarray]:
    """The sampled frames of a GIF's timeline; only the source frames they map to are converted and kept (Pillow
    composes each frame on the one before, so the frames before the last one sampled are decoded, not kept)."""
    with Image.open(path) as im:
        if im.format != "GIF":
            raise VideoError(path, "unreadable video", f"not a GIF but {im.format}")
        durations = _gif_durations(path)
        if len(durations) != im.n_frames:
            raise VideoError(path, "unreadable video", f"{len(durations)} frame(s) in its block structure but "
                             f"Pillow reads {im.n_frames}")
        base = min(durations)
        on_timeline = timeline and base > 0 and all(d % base == 0 for d in durations)
        ends = list(itertools.accumulate(d // base if on_timeline else 1 for d in durations))
        picked = _sample(ends[-1], n_frames, stride, start, path)
        size = im.size
        _check_clip(len(picked), size, path)
        sources = [bisect.bisect_right(ends, t) for t in picked]
        decoded = {}
        for k in sorted(set(sources)):
            im.seek(k)
            if im.size != size:  # Pillow grows the canvas for a frame reaching past it
                raise VideoError(f"{path} frame {k}", "mixed frame sizes", f"{im.width}x{im.height} but frame 0 is "
                                 f"{size[0]}x{size[1]}")
            decoded[k] = np.asarray(im.convert("RGB"))
    return [decoded[k] for k in sources]


def _container_frames(path: Path, n_frames: int | None, stride: int, start: int) -> list[np.ndarray]:
    try:
        import av
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyAV: pip install av") from e
    need = _frames_needed(n_frames, stride, start)
    frames, total = [], 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(path, "unreadable video", "no video stream")
            for frame in container.decode(video=0):
                if total >= start and (total - start) % stride == 0:  # sampled: checked, then converted
                    _check_clip(n_frames or len(frames) + 1, (frame.width, frame.height), path)
                    frames.append(frame.to_ndarray(format="rgb24"))
                total += 1
                if need is not None and total >= need:
                    break
    except av.FFmpegError as e:
        raise VideoError(path, "unreadable video", f"{type(e).__name__}: {e}") from e
    _sample(total, n_frames, stride, start, path)  # "video too short" when it ended early
    return frames


def _folder_frames(folder: Path, n_frames: int | None, stride: int, start: int) -> list[np.ndarray]:
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise VideoError(folder, "no frames", f"no {'/'.join(FRAME_SUFFIXES)} files in this folder")
    picked = [files[i] for i in _sample(len(files), n_frames, stride, start, folder)]
    _check_clip(len(picked), None, folder)
    frames, size = [], None
    for p in picked:
        try:
            with Image.open(p) as im:  # the header only: sizes are checked before pixels are decoded
                if size is None:
                    size = im.size
                    _check_clip(len(picked), size, folder)
                elif im.size != size:
                    raise VideoError(p, "mixed frame sizes", f"{im.width}x{im.height} but {picked[0]} is "
                                     f"{size[0]}x{size[1]}")
                im.load()
                frames.append(np.asarray(im.convert("RGB")))
        except VideoError:
            raise
        except IMAGE_ERRORS as e:
            raise VideoError(p, image_reason(e, "unreadable frame"), f"{type(e).__name__}: {e}") from e
    return frames


def _file_frames(path: Path, n_frames: int | None, stride: int, start: int, gif_timeline: bool) -> list[np.ndarray]:
    """The sampled frames of a file or folder, read within MAX_FRAMES / MAX_PIXELS."""
    suffix = path.suffix.lower()
    if not path.is_dir() and not path.is_file():
        raise VideoError(path, "video file not found")
    if path.is_file() and suffix != ".gif" and suffix not in CONTAINER_SUFFIXES:
        raise VideoError(path, "unsupported video file", f"expected .gif, {', '.join(CONTAINER_SUFFIXES)} "
                         "or a folder of frames")
    if n_frames is not None:
        _check_clip(n_frames, None, path)
    if path.is_dir():
        return _folder_frames(path, n_frames, stride, start)
    if suffix in CONTAINER_SUFFIXES:
        frames = _container_frames(path, n_frames, stride, start)
    else:
        try:
            frames = _gif_frames(path, n_frames, stride, start, gif_timeline)
        except VideoError:
            raise
        except (*IMAGE_ERRORS, EOFError, IndexError, struct.error) as e:
            raise VideoError(path, image_reason(e, "unreadable video"), f"{type(e).__name__}: {e}") from e
    _check_sizes(frames, [f"{path} frame {start + k * stride}" for k in range(len(frames))])
    return frames


def read_video(source: Any, n_frames: int | None = None, stride: int = 1, start: int = 0,
               as_array: bool = False, gif_timeline: bool = True) -> list[Image.Image] | np.ndarray:
    """Frames start, start+stride, ..., (n_frames of them; all to the end when None) as RGB PIL images, or as a
    uint8 (F, H, W, 3) array with `as_array`. Raises `VideoError` (a `DataError`) naming the file for a missing,
    unreadable or unsupported file, an empty folder, mixed frame sizes, fewer frames than the sampling needs, or a
    clip from a file over MAX_FRAMES ("video too long") or MAX_PIXELS ("video too large")."""
    _check_sampling(n_frames, stride, start)
    if isinstance(source, (str, os.PathLike)):
        frames = _file_frames(Path(source), n_frames, stride, start, gif_timeline)
    else:
        frames = _in_memory(source)
        frames = [frames[i] for i in _sample(len(frames), n_frames, stride, start, "<frames in memory>")]
    if as_array:
        return np.stack(frames)
    return [Image.fromarray(f) for f in frames]


@dataclass(frozen=True)
class VideoPairRecord:
    caption: str
    frames_w: np.ndarray  # preferred video, uint8 (F, H, W, 3)
    frames_l: np.ndarray  # rejected video
    path_w: Path
    path_l: Path
    where: str            # "file:line" or "dataset[row]" for messages
    extra: dict           # other columns kept


def _csv_rows(path: Path) -> Iterator[tuple[str, Any, Path]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            clean = {k: (v if v != "" else None) for k, v in row.items() if k is not None}
            if None in row:  # more cells than header columns
                yield f"{path}:{reader.line_num}", BadRow("more cells than header columns"), path.parent
                continue
            if isinstance(clean.get("label_0"), str):
                try:
                    clean["label_0"] = float(clean["label_0"])
                except ValueError:
                    pass
            yield f"{path}:{reader.line_num}", clean, path.parent


class _CsvSource:
    """A csv pair file's rows by range. CSV rows may span lines, so a range is reached by reading on from where
    this process's last range ended (ranges asked in increasing order read the file once per process)."""

    def __init__(self, path: Path):
        self.path, self.n = path, sum(1 for _ in _csv_rows(path))
        self._it, self._pos = None, 0

    def __len__(self) -> int:
        return self.n

    def __getstate__(self):
        return {**self.__dict__, "_it": None, "_pos": 0}

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, Any, Path]]:
        stop = self.n if stop is None else min(stop, self.n)
        if self._it is None or start < self._pos:
            self._it, self._pos = _csv_rows(self.path), 0
        for _ in range(start - self._pos):
            next(self._it)
        self._pos = max(start, self._pos)
        while self._pos < stop:
            self._pos += 1
            yield next(self._it)


def pair_source(source: Any):
    """The rows of a video pair source by range: `len()` and `rows(start, stop)` of (where, row, base folder)."""
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == ".csv" and Path(source).is_file():
        return _CsvSource(Path(source))
    from .row_source import RowSource

    return RowSource(source, image_columns=None, jsonl_names=("metadata.jsonl", "pairs.jsonl"))


def _video_path(value: Any, root: Path | None, col: str) -> Path | str:
    """An existing path, or (a plain str) the reason the value is bad."""
    if not isinstance(value, str) or not value:
        return f"missing {col}"
    path = Path(value) if root is None or Path(value).is_absolute() else root / value
    return path if path.exists() else "video file not found"


def _video_columns(row: dict) -> tuple[tuple[str, str], bool]:
    """The row's two video columns and whether they are the labelled (video_0/video_1) kind."""
    if any(row.get(c) is not None for c in _NATIVE):
        return _NATIVE, False
    if any(row.get(c) is not None for c in _LABELLED):
        return _LABELLED, True
    return (), False


def video_pair(where: str, row: dict, base: Path | None, report: SkipReport, n_frames: int | None,
               stride: int = 1, bad_rows: str = "skip", video_root: str | Path | None = None, ties: str = "drop",
               start: int = 0) -> VideoPairRecord | None:
    """One captioned row (see `pairs.captioned_rows`) as a pair with both videos decoded (oriented
    preferred/rejected), or None when it is left out (counted in `report` under bad_rows="skip")."""
    cols, labelled = _video_columns(row)
    if not cols:
        reject(report, bad_rows, "no video columns (video_w/video_l or video_0/video_1)", where)
        return None
    label = pair_label(row.get("label_0")) if labelled else 1.0
    if label is None:
        reject(report, bad_rows, "label_0 missing or not 0, 0.5 or 1", where)
        return None
    root = Path(video_root) if video_root is not None else base
    paths = [_video_path(row.get(c), root, c) for c in cols]
    bad = next((p for p in paths if isinstance(p, str)), None)
    if bad is not None:
        reject(report, bad_rows, bad, where)
        return None
    if tie_left_out(label, ties, report, where, "video"):
        return None
    path_w, path_l = paths if label == 1 else paths[::-1]
    try:
        frames = [read_video(p, n_frames, stride, start, as_array=True) for p in (path_w, path_l)]
    except VideoError as e:
        reject(report, bad_rows, e.reason, f"{where} ({e})")
        return None
    extra = {k: v for k, v in row.items() if k not in _CORE}
    return VideoPairRecord(row["caption"], frames[0], frames[1], path_w, path_l, where, extra)


def iter_video_pairs(rows: Iterable[tuple[str, Any, Path | None]], report: SkipReport, n_frames: int | None,
                     stride: int = 1, bad_rows: str = "skip", video_root: str | Path | None = None,
                     ties: str = "drop", start: int = 0) -> Iterator[VideoPairRecord]:
    """The valid, non-tied pairs of raw (where, row, base) rows, lazily; every row counts in `report.total`
    (the caller sets `report.kept`)."""
    check_policy(bad_rows)
    _check_sampling(n_frames, stride, start)
    check_ties(ties)
    for where, row, base in captioned_rows(rows, report, bad_rows):
        rec = video_pair(where, row, base, report, n_frames, stride, bad_rows, video_root, ties, start)
        if rec is not None:
            yield rec


def read_video_pairs(source: Any, n_frames: int | None, stride: int = 1, bad_rows: str = "skip",
                     video_root: str | Path | None = None, ties: str = "drop",
                     start: int = 0) -> tuple[list[VideoPairRecord], SkipReport]:
    """Valid, non-tied pairs of `source` with both videos decoded (oriented preferred/rejected), and a report of
    every row left out (kept + skipped == total)."""
    check_policy(bad_rows)
    _check_sampling(n_frames, stride, start)
    check_ties(ties)
    report = SkipReport()
    out = list(iter_video_pairs(pair_source(source).rows(), report, n_frames, stride, bad_rows, video_root, ties,
                                start))
    report.kept = len(out)
    return out, report


def referenced_videos(source: Any, video_root: str | Path | None = None) -> Iterator[Path]:
    """Every file the video columns of `source` name (a frame folder: each file in it), placed as `video_pair`
    places them, whether or not it exists: for a cache key (`cache.files_fingerprint`). Nothing is decoded."""
    for _, row, base in pair_source(source).rows():
        if not isinstance(row, dict):
            continue
        root = Path(video_root) if video_root is not None else base
        for col in (*_NATIVE, *_LABELLED):
            value = row.get(col)
            if isinstance(value, str) and value:
                path = Path(value) if root is None or Path(value).is_absolute() else root / value
                yield from sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else (path,)


def write_gif(frames: Any, path: str | Path, frame_ms: int = 100) -> None:
    """Frames (anything `read_video` takes in memory) as a looping GIF; exact for frames of <= 256 colours, and
    `read_video` gives back every frame (merged identical frames are restored from their durations)."""
    if frame_ms <= 0 or frame_ms % 10:
        raise ValueError(f"GIF stores durations in 10 ms steps; frame_ms must be a positive multiple of 10, "
                         f"got {frame_ms}")
    first, *rest = [Image.fromarray(f) for f in _in_memory(frames)]
    first.save(path, save_all=True, append_images=rest, duration=frame_ms, loop=0)


def write_video_pairs_jsonl(out_dir: str | Path, rows: Iterable[tuple[str, Any, Any, dict]],
                            frame_ms: int = 100) -> Path:
    """Write (caption, preferred frames, rejected frames, extra) as `out_dir/videos/*.gif` + `metadata.jsonl`
    rows {caption, video_w, video_l, **extra}; returns the metadata path. `read_video_pairs` reads it back."""
    return write_pair_folder(out_dir, rows, "videos", _NATIVE, _CORE,
                             lambda frames, path: write_gif(frames, path, frame_ms), ("_w.gif", "_l.gif"))
