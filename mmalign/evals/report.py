"""`mmalign report RUN_DIR...`: find what run directories hold and write one self-contained HTML page.

Recognised (searched up to 4 levels deep; checkpoints, caches, model exports and image folders are not entered):
- ``metrics.jsonl`` (core/trainer.py: one JSON object per logged step) -> metric curves, one chart per metric and
  run family (the ``method:`` prefix in the ``config.yaml`` beside it: diffusion, mllm, video), so losses of
  different model kinds never share an axis;
- results files (evals/results.write_results), read by the kind each names (mmalign.kind; lmms-eval's own
  output files, the same layout, count as evaluations; other JSON is not read): the diffusion demo's
  (demo.diffusion.run_demo: base / aligned accuracy, gains, win rates) with its
  ``base/samples.jsonl`` and ``<method>/eval/samples.jsonl`` -> tables and before/after grids paired by
  (prompt, seed); the vision-language demo's (demo.mllm.run_mllm_demo) -> per-capability tables, POPE; any
  other kind (evaluators, the video demo) -> one table per task;
- any other ``samples.jsonl`` (``mmalign sample``, video GIFs) -> paired grids with every other such folder
  sharing its (prompt, seed) pairs, else an image grid.
Training logs and sample folders are named by their folder relative to the folders' common root.
A directory with none of these, or a recognised file that does not parse, is a DataError naming it.
Images are read only from inside the run directory: a sample whose image resolves (symlinks followed) outside it
is not opened, and the page counts it as skipped, "outside the run".
"""
from __future__ import annotations

import base64
import io
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..datasets.records import DataError
from .demo_results import DIFFUSION_DEMO, MLLM_DEMO, unpack_diffusion_demo, unpack_mllm_demo
from .errors import EvalError
from .results import results_kind, task_metrics

SMALL_IMAGE = 64  # px: shown upscaled without smoothing
MAX_SIDE = 256  # px: larger images are downscaled before embedding
PRUNED_DIRS = {"checkpoints", "cache", "ref_cache", "final", "tensorboard", "samples", "images", "pairs"}
MAX_DEPTH = 4
OUTSIDE_RUN = "outside the run"


@dataclass
class Sample:
    file: Path  # resolved when in the run; as written otherwise
    prompt: str
    seed: int | None
    scores: dict
    skipped: str | None = None  # why the image is not shown (OUTSIDE_RUN); None: shown


@dataclass
class SampleSet:
    label: str
    path: Path  # the samples.jsonl
    samples: list[Sample]

    def skips(self) -> dict[str, int]:
        """{reason: count} of samples whose image is not shown."""
        out: dict[str, int] = {}
        for smp in self.samples:
            if smp.skipped:
                out[smp.skipped] = out.get(smp.skipped, 0) + 1
        return out


@dataclass
class TrainingLog:
    name: str
    path: Path
    records: list[dict]
    family: str = "other"  # diffusion / mllm / video, from config.yaml's method; charts never mix families


FAMILIES = ("diffusion", "mllm", "video")


@dataclass
class Run:
    root: Path
    logs: list[TrainingLog] = field(default_factory=list)
    # (results.json, the demo's results as evals.demo_results unpacks them[, their sample sets])
    diffusion: list[tuple[Path, dict, list[SampleSet]]] = field(default_factory=list)
    mllm: list[tuple[Path, dict]] = field(default_factory=list)
    evals: list[tuple[Path, dict]] = field(default_factory=list)  # read_results(...)'s shape: tasks, doc
    sample_sets: list[SampleSet] = field(default_factory=list)  # samples not owned by a demo

    def empty(self) -> bool:
        return not (self.logs or self.diffusion or self.mllm or self.evals or self.sample_sets)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def read_metrics_log(path: Path, name: str) -> TrainingLog:
    """Trainer log lines: {"step": int, "loss": float, "lr": float, <metric>: float, ..., "elapsed_s": float}."""
    records = read_jsonl(path)
    for i, r in enumerate(records, 1):
        if not isinstance(r.get("step"), int) or isinstance(r.get("step"), bool):
            raise DataError(f"{path}: record {i} has no integer 'step' (keys: {sorted(r)})")
    return TrainingLog(name, Path(path), records, run_family(Path(path).parent))


def run_family(folder: Path) -> str:
    """The family of the method in `folder`/config.yaml (the prefix of `method:`, e.g. diffusion_dpo ->
    diffusion; a method outside FAMILIES is its own family); "other" without a readable config."""
    import yaml

    try:
        method = yaml.safe_load((folder / "config.yaml").read_text()).get("method")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        return "other"
    if not isinstance(method, str):
        return "other"
    prefix = method.split("_", 1)[0]
    return prefix if prefix in FAMILIES else method


def folder_labels(folders: list[Path]) -> list[str]:
    """Each folder named by its path relative to all folders' common root (a folder that is that root: its own
    name); repeated names get " (2)", " (3)"..."""
    if not folders:
        return []
    absolute = [Path(os.path.abspath(f)) for f in folders]
    common = Path(os.path.commonpath(absolute))
    labels, seen = [], {}
    for f in absolute:
        rel = f.relative_to(common).as_posix()
        label = f.name if rel == "." else rel
        seen[label] = seen.get(label, 0) + 1
        labels.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return labels


def label_runs(runs: list["Run"]) -> None:
    """Name every training log and plain sample folder of `runs` by folder_labels (demo samples keep theirs)."""
    logs = [log for run in runs for log in run.logs]
    for log, label in zip(logs, folder_labels([log.path.parent for log in logs])):
        log.name = label
    sets = [st for run in runs for st in run.sample_sets]
    for st, label in zip(sets, folder_labels([st.path.parent for st in sets])):
        st.label = label


def read_samples(path: Path, label: str, root: Path) -> SampleSet:
    """samples.jsonl rows {"file_name", "prompt" (or "text"), "seed"?, "scores"?}. An image resolving outside `root`
    (the run directory, resolved) is never opened: the sample is kept, marked skipped OUTSIDE_RUN; every other
    image must exist."""
    path, root = Path(path), Path(root).resolve()
    out = []
    for i, r in enumerate(read_jsonl(path), 1):
        if not isinstance(r.get("file_name"), str):
            raise DataError(f"{path}: row {i} has no 'file_name'")
        prompt = r["prompt"] if "prompt" in r else r.get("text", "")
        seed = r.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise DataError(f"{path}: row {i} has a non-integer seed {seed!r}")
        named = path.parent / r["file_name"]
        try:
            file = named.resolve()
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop
            raise DataError(f"{path}: row {i} names {r['file_name']!r}, which cannot be resolved ({e})") from None
        if not file.is_relative_to(root):
            out.append(Sample(named, str(prompt), seed, r.get("scores") or {}, skipped=OUTSIDE_RUN))
            continue
        if not file.is_file():
            raise DataError(f"{path}: row {i} names {r['file_name']!r}, which does not exist")
        out.append(Sample(file, str(prompt), seed, r.get("scores") or {}))
    return SampleSet(label, path, out)


def image_uri(path: Path, max_side: int = MAX_SIDE) -> tuple[str, int]:
    """(data URI, longest side in px). Small PNG/JPEG/GIF files are embedded byte for byte; larger images are
    downscaled to `max_side` (animated GIFs frame by frame, keeping durations and looping). An image over Pillow's
    decompression-bomb limit is not decoded: a placeholder naming the file and "image too large" stands in."""
    from html import escape

    from PIL import Image, ImageSequence

    from ..datasets.records import IMAGE_ERRORS, TOO_LARGE, image_reason

    try:
        im = Image.open(path)
        im.load()
    except IMAGE_ERRORS as e:
        if image_reason(e) != TOO_LARGE:
            raise DataError(f"{path}: not a readable image ({e})") from None
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{max_side}" height="{max_side // 2}">'
               f'<rect width="100%" height="100%" fill="#fee"/><text x="6" y="20" font-size="14">{TOO_LARGE}</text>'
               f'<text x="6" y="40" font-size="11">{escape(Path(path).name)}</text></svg>')
        return f"data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode('ascii')}", max_side
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif"}.get(im.format)
    side = max(im.size)
    if mime and side <= max_side:
        data = Path(path).read_bytes()
    else:
        scale = max_side / side if side > max_side else 1.0
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        buf = io.BytesIO()
        if getattr(im, "is_animated", False):
            frames = [f.convert("RGBA").resize(size) for f in ImageSequence.Iterator(im)]
            frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], loop=im.info.get("loop", 0),
                           duration=im.info.get("duration", 100), disposal=2)
            mime = "image/gif"
        else:
            im.convert("RGBA").resize(size).save(buf, "PNG")
            mime = "image/png"
        data, side = buf.getvalue(), max(size)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", side


def pair_by_prompt_seed(sets: list[SampleSet]) -> tuple[list[tuple[str, int]], list[str]]:
    """Keys (prompt, seed) present in every set, in the first set's order, and one warning per set with
    samples the first set lacks (or lacking some of its samples). DataError on duplicate keys, missing
    seeds, or sets sharing no key at all: those are not before/after comparisons."""
    keyed = []
    for s in sets:
        keys = {}
        for i, smp in enumerate(s.samples, 1):
            if smp.seed is None:
                raise DataError(f"{s.path}: row {i} has no seed; before/after pairing needs (prompt, seed)")
            k = (smp.prompt, smp.seed)
            if k in keys:
                raise DataError(f"{s.path}: (prompt, seed) {k!r} appears twice")
            keys[k] = smp
        keyed.append(keys)
    common = [k for k in keyed[0] if all(k in d for d in keyed[1:])]
    warnings = []
    for s, d in zip(sets[1:], keyed[1:]):
        shared = sum(k in keyed[0] for k in d)
        if shared == 0:
            raise DataError(f"{s.path} shares no (prompt, seed) with {sets[0].path}: not the same prompts and seeds")
        only_here, only_first = len(d) - shared, len(keyed[0]) - shared
        if only_here or only_first:
            warnings.append(f"{s.label}: {only_first} of {sets[0].label}'s (prompt, seed) pairs missing, "
                            f"{only_here} extra; only pairs present in every model are shown")
    return common, warnings


@contextmanager
def guarded(path: Path):
    """Around reading or rendering a file of a recognised kind: an unexpected shape is a DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
        raise DataError(f"{path}: unexpected contents ({type(e).__name__}: {e})") from None


def _diffusion_sample_sets(results_path: Path, results: dict, root: Path) -> list[SampleSet]:
    here = results_path.parent
    candidates = [("base", here / "base" / "samples.jsonl")]
    candidates += [(m, here / m / "eval" / "samples.jsonl") for m in results["aligned"]]
    return [read_samples(p, label, root) for label, p in candidates if p.is_file()]


def _read_results_file(run: Run, path: Path, doc: dict) -> list[Path]:
    """File one results document under its kind; returns the sample files it owns."""
    kind = results_kind(doc)
    with guarded(path):
        if kind == DIFFUSION_DEMO:
            results = unpack_diffusion_demo(doc)
            sets = _diffusion_sample_sets(path, results, run.root)
            run.diffusion.append((path, results, sets))
            return [s.path for s in sets]
        if kind == MLLM_DEMO:
            run.mllm.append((path, unpack_mllm_demo(doc)))
        elif kind is not None:
            run.evals.append((path, {"tasks": task_metrics(doc), "doc": doc}))
    return []


def _walk(root: Path):
    """(directory, file names) up to MAX_DEPTH levels below root, pruned directories not entered."""
    for d, dirs, files in os.walk(root):
        depth = len(Path(d).relative_to(root).parts)
        dirs[:] = sorted(x for x in dirs if x not in PRUNED_DIRS and not x.startswith(".") and depth < MAX_DEPTH)
        yield Path(d), sorted(files)


def discover(root) -> Run:
    """Everything recognisable under one run directory (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    run, owned = Run(root), set()
    for d, files in _walk(root):
        rel = d.relative_to(root).as_posix()
        if "metrics.jsonl" in files:
            run.logs.append(read_metrics_log(d / "metrics.jsonl", rel))
        for f in (x for x in files if x.endswith(".json")):
            owned |= set(_read_results_file(run, d / f, read_json(d / f)))
    for d, files in _walk(root):
        if "samples.jsonl" in files and d / "samples.jsonl" not in owned:
            run.sample_sets.append(read_samples(d / "samples.jsonl", d.relative_to(root).as_posix(), root))
    if run.empty():
        raise DataError(f"{root}: nothing to report (no metrics.jsonl, demo results.json, evaluation results "
                        f"file or samples.jsonl within {MAX_DEPTH} levels)")
    label_runs([run])
    return run


def build_report(run_dirs, smooth: float | None = None, max_images: int = 64) -> str:
    """The HTML page for one or more run directories. `smooth`: the curves' EMA weight; None: AUTO_SMOOTH for
    curves with many points (svg_chart.SMOOTH_FROM), none for short ones."""
    from .report_html import render_page

    if not run_dirs:
        raise ValueError("give at least one run directory")
    if smooth is not None and not 0 <= smooth < 1:
        raise ValueError(f"smoothing weight must lie in [0, 1), got {smooth}")
    runs = [discover(r) for r in run_dirs]
    label_runs(runs)
    return render_page(runs, smooth=smooth, max_images=max_images)


def write_report(run_dirs, out=None, smooth: float | None = None, max_images: int = 64) -> Path:
    out = Path(out) if out else Path(run_dirs[0]) / "report.html"
    page = build_report(run_dirs, smooth, max_images)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def cmd_report(a) -> None:
    try:
        path = write_report(a.run_dirs, a.out, a.smooth, a.max_images)
    except (DataError, ValueError) as e:
        raise EvalError(f"report: {e}") from e
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def register(sub) -> None:
    """Add the top-level `report` verb to the `mmalign` parser's subparsers."""
    p = sub.add_parser("report", help="one self-contained HTML page for run directories",
                       description="Write one HTML page (inline SVG charts, embedded images, no external "
                                   "resources) from training logs, demo results, evaluation results and samples.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output file (default: <first RUN_DIR>/report.html)")
    p.add_argument("--smooth", type=float, default=None,
                   help="EMA smoothing weight for curves, in [0, 1) (default: 0.6 for curves of 20 or more points)")
    p.add_argument("--max-images", type=int, default=64, help="most images embedded per grid")
    p.set_defaults(fn=cmd_report)
