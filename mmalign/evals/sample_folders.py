"""Sample folders as `mmalign.diffusion.sampling.save_samples` writes them: ``samples.jsonl`` (rows ``file_name``,
``prompt``, ``seed``) and the images it names; a run's ``samples/`` sub-folder itself may be given."""
from __future__ import annotations

from pathlib import Path

PAIR_SKIPPED = "its pair in the other folder was skipped"


def samples_root(folder: str | Path) -> Path:
    """The folder holding samples.jsonl: `folder` itself or, for a run's samples/ folder, its parent."""
    folder = Path(folder)
    for root in (folder, folder.parent):
        if (root / "samples.jsonl").is_file():
            return root
    raise FileNotFoundError(f"{folder}: no samples.jsonl here or in its parent (rows file_name, prompt, seed)")


def parse_rows(folder: str | Path, bad_rows: str):
    """(root, entries, report): one entry per non-blank line, the row dict (with its image path, None when the
    file is missing) or None when the row itself is bad; bad rows are counted under "skip", a DataError under
    "error"."""
    from ..datasets.records import SkipReport, jsonl_rows, reject

    root = samples_root(folder)
    report, entries = SkipReport(), []
    for where, row in jsonl_rows(root / "samples.jsonl", report, bad_rows):
        entries += [None] * (report.total - 1 - len(entries))  # a None for each line before that was not JSON
        why = _row_problem(row)
        if why is not None:
            reject(report, bad_rows, why, where)
            entries.append(None)
            continue
        path = root / row["file_name"]
        if not path.is_file():  # the row's prompt and seed still count for compare's alignment check
            reject(report, bad_rows, "image file not found", where)
            path = None
        entries.append({**row, "path": path, "where": where})
    entries += [None] * (report.total - len(entries))  # trailing lines that were not JSON
    return root, entries, report


def _row_problem(row) -> str | None:
    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
        return "missing file_name"
    if not isinstance(row.get("prompt"), str):
        return "missing or non-string prompt"
    if not isinstance(row.get("seed"), int) or isinstance(row.get("seed"), bool):
        return "missing or non-integer seed"
    return None


def load_images(entries, report, bad_rows: str) -> list:
    """Decode each entry's image (None for bad rows, or ones that do not decode)."""
    from ..datasets.records import open_rgb

    return [None if e is None or e["path"] is None else open_rgb(e["path"], report, bad_rows, e["where"])
            for e in entries]


def aligned_pairs(a_entries, b_entries, a_root, b_root) -> None:
    """Refuse (DataError) unless both folders list the same (prompt, seed) rows in the same order; rows bad in
    either folder are left to the bad-row policy and are not compared."""
    from ..datasets.records import DataError

    if len(a_entries) != len(b_entries):
        raise DataError(f"{a_root} has {len(a_entries)} rows but {b_root} has {len(b_entries)}: compare needs "
                         f"the same prompts and seeds in the same order")
    for k, (x, y) in enumerate(zip(a_entries, b_entries)):
        if x is not None and y is not None and (x["prompt"], x["seed"]) != (y["prompt"], y["seed"]):
            raise DataError(f"row {k + 1} differs: {x['where']} has prompt {x['prompt']!r} seed {x['seed']}, "
                             f"{y['where']} has prompt {y['prompt']!r} seed {y['seed']}")


def keep_complete_pairs(a_images, b_images, a_entries, b_entries, a_report, b_report) -> tuple[list, list]:
    """Images of the pairs decoded in both folders (None elsewhere). A good row whose pair is bad in the other
    folder is counted as a skip, so each folder's kept + skipped adds up to its rows."""
    a_out, b_out = [], []
    for x, y, ex, ey in zip(a_images, b_images, a_entries, b_entries):
        if x is not None and y is None:
            a_report.skip(PAIR_SKIPPED, ex["where"])
        if y is not None and x is None:
            b_report.skip(PAIR_SKIPPED, ey["where"])
        paired = x is not None and y is not None
        a_out.append(x if paired else None)
        b_out.append(y if paired else None)
    return a_out, b_out


def per_prompt_means(prompts: list[str], a_scores: list[float], b_scores: list[float]):
    """Mean A and B score per distinct prompt (over its seeds), prompts in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    a = [sum(a_scores[i] for i in ix) / len(ix) for ix in groups.values()]
    b = [sum(b_scores[i] for i in ix) / len(ix) for ix in groups.values()]
    return list(groups), a, b
