"""Image grids for `mmalign report`: paired before/after blocks (same prompt and seed), ordered so that the
blocks where the models disagree most come first, and plain grids for unpaired sample folders. Returns HTML
strings with every text escaped."""
from __future__ import annotations

from html import escape
from itertools import combinations
from pathlib import Path

from ..datasets.records import DataError
from .report import SMALL_IMAGE, Sample, SampleSet, image_uri, pair_by_prompt_seed

THUMB = 16  # px: side of the thumbnails compared when no score tells the models apart


def img_tag(path: Path, alt: str) -> str:
    uri, side = image_uri(path)
    cls = "t px" if side <= SMALL_IMAGE else "t"
    return f'<img class="{cls}" src="{uri}" alt="{escape(alt)}" title="{escape(alt)}">'


def _scores(scores: dict) -> tuple[str, str]:
    """(visible, tooltip): the 'correct' score alone when present (ShapeWorld's overall verdict), else all."""
    full = " · ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in scores.items())
    shown = f"correct {scores['correct']:g}" if isinstance(scores.get("correct"), (int, float)) else full
    return shown, full


def _figure(smp: Sample, alt: str, label: str) -> str:
    shown, full = _scores(smp.scores)
    pic = img_tag(smp.file, alt) if smp.skipped is None else f'<div class="skip">skipped: {escape(smp.skipped)}</div>'
    return (f'<figure title="{escape(full)}">{pic}<figcaption>{escape(label)}'
            f'{"<br>" + escape(shown) if shown else ""}</figcaption></figure>')


def skip_note(sets: list[SampleSet]) -> str:
    """A warning counting, per sample file, the images not shown and why (empty when none was skipped)."""
    parts = [f"{st.label}: " + ", ".join(f"{n} {reason}" for reason, n in st.skips().items())
             for st in sets if st.skips()]
    if not parts:
        return ""
    return (f'<p class="warn">Images skipped (never read): {escape("; ".join(parts))}. Only files inside the run '
            f"directory are embedded.</p>")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def shared_score(groups: list[list[Sample]]) -> str | None:
    """The score every sample of every block has ('correct' when it qualifies, else the first such key)."""
    samples = [s for g in groups for s in g]
    if not samples:
        return None
    common = [k for k, v in samples[0].scores.items() if _number(v) and all(_number(s.scores.get(k)) for s in samples)]
    return "correct" if "correct" in common else (common[0] if common else None)


def _thumb(smp: Sample):
    """A small greyscale thumbnail as bytes (one per pixel); None when the image is not shown or not readable."""
    from PIL import Image

    from ..datasets.records import IMAGE_ERRORS

    if smp.skipped is not None:  # never open an image outside the run
        return None
    try:
        with Image.open(smp.file) as im:
            im.draft("L", (THUMB * 4, THUMB * 4))  # JPEG: decode at reduced size
            return im.convert("L").resize((THUMB, THUMB)).tobytes()
    except IMAGE_ERRORS:
        return None  # the grid's own read reports it, if the block is shown


def disagreement(groups: list[list[Sample]]) -> tuple[list[float], str]:
    """Per block (one sample per set): how much the sets disagree, and how that was measured. With a shared
    score: max - min of it over the sets; else the mean absolute grey-level difference (0-255) of each set's
    THUMB x THUMB thumbnail to the first set's (0 where an image cannot be read)."""
    key = shared_score(groups)
    if key is not None:
        return [max(s.scores[key] for s in g) - min(s.scores[key] for s in g) for g in groups], f"|Δ {key}|"
    out = []
    for g in groups:
        thumbs = [_thumb(s) for s in g]
        if thumbs[0] is None or any(t is None for t in thumbs[1:]):
            out.append(0.0)
            continue
        diffs = [sum(abs(a - b) for a, b in zip(thumbs[0], t)) / len(t) for t in thumbs[1:]]
        out.append(sum(diffs) / len(diffs))
    return out, "pixel difference"


def compare_grid(sets: list[SampleSet], max_images: int) -> str:
    """One block per (prompt, seed) present in every set, the set's images side by side (first set first), the
    blocks where the sets disagree most first; at most `max_images` images."""
    keys, warnings = pair_by_prompt_seed(sets)
    lookup = [{(s.prompt, s.seed): s for s in st.samples} for st in sets]
    groups = [[d[k] for d in lookup] for k in keys]
    scores, measure = disagreement(groups)
    order = sorted(range(len(keys)), key=lambda i: -scores[i])  # stable: ties keep the first set's order
    n_blocks = min(len(keys), max(1, max_images // len(sets)))
    blocks = []
    for i in order[:n_blocks]:
        prompt, seed = keys[i]
        figs = "".join(_figure(smp, f"{st.label}: {prompt} (seed {seed})", st.label)
                       for st, smp in zip(sets, groups[i]))
        blocks.append(f'<div class="pair"><div class="cap">{escape(prompt)} <span class=note>seed {seed} · '
                      f'{escape(measure)} {scores[i]:.3g}</span></div>{figs}</div>')
    note = (f"<p class=note>Same prompts and seeds in every block ({' | '.join(escape(s.label) for s in sets)}), "
            f"largest disagreement ({escape(measure)}) first. Showing {n_blocks} of {len(keys)} paired (prompt, "
            f"seed) blocks ({n_blocks * len(sets)} images; at most {max_images} images per grid).</p>")
    warn = "".join(f'<p class="warn">{escape(w)}</p>' for w in warnings) + skip_note(sets)
    return warn + note + '<div class="blocks">' + "".join(blocks) + "</div>"


def sample_grid(st: SampleSet, max_images: int) -> str:
    shown = st.samples[:max_images]
    figs = [_figure(s, s.prompt, s.prompt + ("" if s.seed is None else f" (seed {s.seed})")) for s in shown]
    note = (f"<p class=note>Showing {len(shown)} of {len(st.samples)} samples from {escape(str(st.path))} "
            f"(at most {max_images} images per grid).</p>")
    return skip_note([st]) + note + '<div class="blocks">' + "".join(figs) + "</div>"


def pairable(a: SampleSet, b: SampleSet) -> bool:
    """Whether two sample folders are a before/after comparison: seeds everywhere, no duplicate (prompt, seed),
    at least one pair in common."""
    try:
        return bool(pair_by_prompt_seed([a, b])[0])
    except DataError:
        return False


def sample_folder_grids(sets: list[SampleSet], max_images: int) -> str:
    """A paired grid for every two folders with shared (prompt, seed) pairs; a plain grid for each other folder."""
    out, paired = [], set()
    for i, j in combinations(range(len(sets)), 2):
        if pairable(sets[i], sets[j]):
            paired |= {i, j}
            out.append(f"<h3>{escape(sets[i].label)} vs {escape(sets[j].label)}</h3>"
                       + compare_grid([sets[i], sets[j]], max_images))
    for i, st in enumerate(sets):
        if i not in paired:
            out.append(f"<h3>Samples: {escape(st.label)}</h3>" + sample_grid(st, max_images))
    return "".join(out)
