"""`mmalign report`: SVG charts, discovery of run directories, the HTML page, and the page in real Chromium."""
import base64
import io
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from mmalign.cli import main
from mmalign.datasets.records import DataError
from mmalign.evals.demo_results import write_diffusion_demo, write_mllm_demo
from mmalign.evals.report import build_report, discover, write_report
from mmalign.evals.results import TaskResult, write_results
from mmalign.evals.svg_chart import ema, line_chart, nice_ticks

EVIL = '<script>alert("x")</script> & a red circle'


def _png(path: Path, colour, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def _samples(folder: Path, rows: list[tuple[str, int, float]], colour) -> None:
    """samples.jsonl + samples/*.png as diffusion.sampling.save_samples writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "samples.jsonl", "w") as f:
        for i, (prompt, seed, correct) in enumerate(rows):
            _png(folder / f"samples/{i:05d}.png", colour)
            f.write(json.dumps({"file_name": f"samples/{i:05d}.png", "prompt": prompt, "seed": seed,
                                "scores": {"colour": correct, "correct": correct}}) + "\n")


def acc_ci(mean, lo, hi, n=3):
    return {"mean": mean, "ci95": [lo, hi], "n": n}


def diffusion_demo_results(base: dict, aligned: dict, n: int = 3) -> dict:
    """The dict demo.diffusion.run_demo builds, around the given accuracies."""
    return {"model": "tiny/<sd>", "n_prompts": n, "prompt_seed": 20000, "sample_seeds": [0, n - 1],
            "sampler": {"scheduler": "DDIMScheduler", "steps": 5, "guidance": 4.0}, "settings": {"n": n},
            "base": {"accuracy": base, "eval_seconds": 1.5}, "aligned": aligned, "seconds": 30.0}


def diffusion_run(root: Path) -> Path:
    """A run directory shaped like demo.run_demo's output: base + one aligned method, log, samples."""
    rows = [(EVIL, 0, 1.0), ("two blue squares", 1, 0.0), ("a green triangle", 2, 0.0)]
    _samples(root / "base", rows, (200, 0, 0))
    _samples(root / "dpo" / "eval", [rows[2], rows[0], (rows[1][0], 1, 1.0)], (0, 0, 200))  # other order
    write_diffusion_demo(root / "results.json", diffusion_demo_results(
        {"colour": acc_ci(0.414, 0.356, 0.477), "correct": acc_ci(0.25, 0.1, 0.4)},
        {"dpo": {"accuracy": {"colour": acc_ci(0.5, 0.4, 0.6), "correct": acc_ci(0.3, 0.2, 0.4)},
                 "gain": {"colour": {"gain": 0.05, "ci95": [0.01, 0.09], "n": 3},
                          "correct": {"gain": 0.02, "ci95": [-0.03, 0.07], "n": 3}},
                 "win_rate": {"wins": 53, "ties": 167, "losses": 36, "win_rate": 0.533, "ci95": [0.498, 0.568],
                              "n": 256},
                 "train_seconds": 12.5, "guidance": 4.0}}))
    log = [{"step": 10, "loss": 0.69, "lr": 1e-4, "implicit_acc": 0.5, "elapsed_s": 1.0},
           {"step": 20, "loss": float("nan"), "lr": 1e-4, "implicit_acc": 0.6, "elapsed_s": 2.0},
           {"step": 30, "loss": 0.41, "lr": 5e-5, "implicit_acc": 0.75, "elapsed_s": 3.0}]
    (root / "dpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return root


def mllm_demo_results() -> dict:
    """The dict demo.mllm.run_mllm_demo builds (small made-up numbers)."""
    pope = {"accuracy": 0.75, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 0.5, "n": 4, "unparsed": 1}
    side = {"table": {"colour": {"score": 50.0, "n": 4}}, "overall": 50.0, "macro": 50.0, "pope": pope}
    return {"model": "tiny/llava", "settings": {"eval_scenes": 2}, "heldout_seed": 40000, "pair_seed": 50000,
            "n_questions": 4, "pairs": {"n_pairs": 7, "no_preference": 1, "n_prompts": 4}, "train_seconds": 2.5,
            "base": side, "aligned": {**side, "overall": 62.5},
            "comparison": {"table": {"colour": {"before": 50.0, "after": 75.0, "gain": 25.0, "ci95": [5.0, 50.0],
                                                "n": 4, "significant": True}},
                           "overall": {"before": 50.0, "after": 62.5, "gain": 12.5, "ci95": [-5.0, 30.0], "n": 8},
                           "pope": {"before": {"accuracy": 0.75, "f1": 2 / 3, "yes_ratio": 0.5},
                                    "after": {"accuracy": 0.75, "f1": 2 / 3, "yes_ratio": 0.5}}},
            "seconds": 9.0}


def mllm_results(folder: Path) -> None:
    write_mllm_demo(folder / "results.json", mllm_demo_results())


def eval_results(folder: Path) -> None:
    t = TaskResult(metrics={"accuracy": 0.8125}, higher_is_better={"accuracy": True}, n_original=16,
                   stderr={"accuracy": 0.0976}, extra={"ci95": [0.625, 1.0], "table": {"count": {"score": 75, "n": 8}}})
    write_results(folder / "pope.json", {"pope_sw": t}, model="tiny/llava", provenance={"judge": "rule <exact>"})


def full_run(root: Path) -> Path:
    diffusion_run(root)
    mllm_results(root / "mllm")
    eval_results(root / "eval")
    return root


def img_srcs(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]+)"', page)


# --- charts -------------------------------------------------------------------------------------------------------

def test_nice_ticks_and_ema_by_hand():
    assert nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(10, 150) == [0, 50, 100, 150]  # raw step 35 -> 50; outer ticks enclose the data
    assert nice_ticks(-2.3, 7.9) == [-5, 0, 5, 10]
    assert nice_ticks(5, 5) == [4.5, 4.75, 5.0, 5.25, 5.5]  # flat range widened by |lo| / 10
    # w = 0.5: s1 = 0.5, /(1-0.5) = 1; s2 = 0.25 + 1.5 = 1.75, /(1-0.25) = 7/3; NaN passes through untouched
    out = ema([1.0, float("nan"), 3.0], 0.5)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == pytest.approx(7 / 3)
    assert ema([1.0, 2.0], 0.0) == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ema([1.0], 1.0)


def test_line_chart_maps_data_to_the_plot_corners_and_breaks_at_nan():
    svg = line_chart({"a<b": [(0, 0.0), (10, 1.0)]}, "loss & co")
    # plot box: left 62, top 26, width 520-62-12 = 446, height 240-26-38 = 176; ticks x [0, 10], y [0, 1]
    assert 'points="62.0,202.0 508.0,26.0"' in svg
    assert "loss &amp; co" in svg and "a&lt;b" in svg and "a<b" not in svg
    long = [(0, 0.0), (1, float("nan")), (2, 1.0), (3, 0.5), (4, 0.2), (5, 0.3), (6, 0.1), (7, 0.4)]
    broken = line_chart({"s": long}, "t")
    assert broken.count("<polyline") == 1 and broken.count("<circle") == 1  # NaN splits; a lone point is a dot
    smoothed = line_chart({"s": long}, "t", smooth=0.5)
    assert smoothed.count("<polyline") == 2 and 'stroke-opacity="0.25"' in smoothed  # raw faint + EMA


def test_few_points_are_marked_and_labelled():
    one = line_chart({"run": [(10, 0.69)]}, "loss")  # a 10-step run logged every 10 steps
    assert one.count('<circle class="pt"') == 1 and 'r="4"' in one and ">0.69</text>" in one
    assert "<title>run: step 10, 0.69</title>" in one
    few = line_chart({"run": [(10, 0.7), (20, 0.5), (30, 0.4)]}, "loss", smooth=0.6)
    assert few.count('<circle class="pt"') == 3 and few.count("<polyline") == 1  # too few to smooth
    with pytest.raises(ValueError, match="no finite points"):
        line_chart({"s": [(0, float("nan"))]}, "t")


# --- the page -----------------------------------------------------------------------------------------------------

def test_report_tables_images_and_escaping(tmp_path):
    root = full_run(tmp_path / "run")
    run = discover(root)
    assert [x.name for x in run.logs] == ["dpo"] and len(run.diffusion) == 1 and len(run.mllm) == 1
    assert len(run.evals) == 1 and run.sample_sets == []  # the demo's sample files belong to the demo
    page = build_report([root])
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; a red circle" in page
    srcs = img_srcs(page)
    assert len(srcs) == 6  # 3 (prompt, seed) pairs x (base, dpo)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
    first = root / "base" / "samples" / "00000.png"  # small PNGs travel byte for byte
    assert base64.b64decode(srcs[0].split(",", 1)[1]) == first.read_bytes()
    # every resource inline: no src/href other than data: URIs and in-page anchors
    assert all(v.startswith(("data:", "#")) for v in re.findall(r'(?:src|href)="([^"]*)"', page))
    assert "41.4 [35.6, 47.7]" in page and "50.0 [40.0, 60.0]" in page  # accuracy with CIs, x100
    assert "<b>+5.0 [+1.0, +9.0]</b>" in page  # CI excludes 0: bold
    assert "+2.0 [-3.0, +7.0]" in page and "<b>+2.0" not in page
    assert "53.3 [49.8, 56.8]" in page and "53 / 167 / 36" in page  # win rate, W/T/L
    assert "<b>+25.0 [+5.0, +50.0]</b>" in page and "+12.5 [-5.0, +30.0]" in page  # VQA per capability
    assert "<td>66.7</td>" in page  # POPE F1 x 100
    assert "<td class=l>accuracy</td><td>0.8125</td><td>0.0976</td><td>[0.625, 1]</td><td>↑</td>" in page
    assert "<th class=l></th><th>score</th><th>n</th></tr><tr><td class=l>count</td><td>75</td><td>8</td>" in page
    assert "rule &lt;exact&gt;" in page and "Base tiny/&lt;sd&gt;;" in page  # provenance, model: escaped
    assert page.count('<svg class="chart"') == 3  # loss, lr, implicit_acc


def test_pairs_by_prompt_and_seed_and_flags_mismatches(tmp_path):
    root = diffusion_run(tmp_path / "run")
    page = build_report([root])
    # dpo's rows are in another order: each block must pair base and dpo images of the same (prompt, seed)
    blocks = re.findall(r'<div class="pair"><div class="cap">(.*?)</div>(.*?)</div>(?=<div class="pair">|</div>)',
                        page)
    assert len(blocks) == 3 and "two blue squares" in blocks[0][0]  # the only disagreement comes first
    assert "dpo<br>correct 1" in blocks[0][1] and "base<br>correct 0" in blocks[0][1]
    assert "|Δ correct| 1" in blocks[0][0] and "|Δ correct| 0" in blocks[1][0]
    # one extra and one missing (prompt, seed) in dpo: flagged on the page, only common pairs shown
    _samples(root / "dpo" / "eval", [(EVIL, 0, 1.0), ("two blue squares", 9, 1.0)], (0, 0, 200))
    page = build_report([root])
    assert "dpo: 2 of base&#x27;s (prompt, seed) pairs missing, 1 extra" in page and len(img_srcs(page)) == 2
    _samples(root / "dpo" / "eval", [("other", 0, 1.0)], (0, 0, 200))
    with pytest.raises(DataError, match="shares no \\(prompt, seed\\)"):
        build_report([root])
    _samples(root / "dpo" / "eval", [(EVIL, 0, 1.0), (EVIL, 0, 0.0)], (0, 0, 200))
    with pytest.raises(DataError, match="appears twice"):
        build_report([root])


def test_image_limit_gifs_downscaling_and_plain_samples(tmp_path):
    root = tmp_path / "run"
    rows = [(f"prompt {i}", i, 1.0) for i in range(10)]
    _samples(root / "base", rows, (0, 200, 0))
    _samples(root / "m" / "eval", rows, (0, 0, 200))
    write_diffusion_demo(root / "results.json", diffusion_demo_results({}, {"m": {
        "accuracy": {}, "gain": {}, "win_rate": {"wins": 1, "ties": 8, "losses": 1, "win_rate": 0.5,
                                                 "ci95": [0.4, 0.6], "n": 10}}}, n=10))
    page = build_report([root], max_images=5)
    assert len(img_srcs(page)) == 4 and "Showing 2 of 10 paired (prompt, seed) blocks" in page
    video = tmp_path / "video"  # a samples.jsonl of GIF clips (no demo around it) and one large PNG
    video.mkdir()
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue")]
    frames[0].save(video / "clip.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    _png(video / "big.png", (9, 9, 9), size=300)
    (video / "samples.jsonl").write_text(json.dumps({"file_name": "clip.gif", "text": "a moving circle"}) + "\n"
                                         + json.dumps({"file_name": "big.png", "prompt": "big", "seed": 3}) + "\n")
    srcs = img_srcs(build_report([video]))
    gif = Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1])))
    assert srcs[0].startswith("data:image/gif;base64,") and gif.n_frames == 3
    big = Image.open(io.BytesIO(base64.b64decode(srcs[1].split(",", 1)[1])))
    assert big.size == (256, 256)


def test_side_by_side_and_base_only_run(tmp_path):
    a = diffusion_run(tmp_path / "a")
    only = tmp_path / "base_only"  # mmalign demo --methods none
    _samples(only / "base", [("two blue squares", 1, 1.0)], (1, 2, 3))
    write_diffusion_demo(only / "results.json", diffusion_demo_results({"colour": acc_ci(0.9, 0.8, 1.0, 1)}, {}, 1))
    (only / "notes.json").write_text(json.dumps({"results": {}, "higher_is_better": {}}))  # not an mmalign file
    page = build_report([a, only])
    side = page.split("<h3>Side by side</h3>")[1].split("<section")[0]
    assert "<td class=l>diffusion colour accuracy % (base)</td><td>41.4</td><td>90.0</td>" in side
    assert "win rate" not in side  # only in one run


def test_clear_errors_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="nothing to report"):
        discover(tmp_path / "empty")
    root = diffusion_run(tmp_path / "run")
    log = root / "dpo" / "metrics.jsonl"
    log.write_text(log.read_text() + "{not json\n")
    with pytest.raises(DataError, match=re.escape(f"{log}:4: not valid JSON")):
        discover(root)
    log.write_text('{"loss": 1.0}\n')
    with pytest.raises(DataError, match="no integer 'step'"):
        discover(root)
    log.unlink()
    doc = json.loads((root / "results.json").read_text())
    del doc["mmalign"]["extra"]["shapeworld_t2i_dpo"]["win_rate"]
    (root / "results.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=re.escape(f"{root / 'results.json'}: unexpected contents")):
        build_report([root])
    del doc["mmalign"]["extra"]["shapeworld_t2i_dpo"]["ci95"]  # read when the run is discovered
    (root / "results.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=re.escape(f"{root / 'results.json'}: unexpected contents")):
        discover(root)
    (root / "results.json").write_text("{")
    with pytest.raises(DataError, match=re.escape(f"{root / 'results.json'}: not valid JSON")):
        discover(root)
    (root / "results.json").unlink()
    (root / "base" / "samples" / "00001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="00001.png: not a readable image"):
        build_report([root])
    (root / "base" / "samples" / "00001.png").unlink()
    with pytest.raises(DataError, match="row 2 names 'samples/00001.png', which does not exist"):
        discover(root)


def test_images_outside_the_run_are_never_read_and_counted(tmp_path):
    root = tmp_path / "runs" / "run"
    secret, linked = tmp_path / "secret.png", tmp_path / "elsewhere" / "linked.png"
    _png(secret, (11, 22, 33))
    _png(linked, (44, 55, 66))
    (tmp_path / "junk.png").write_bytes(b"not a png")  # opening it would be a DataError
    _png(root / "samples" / "in.png", (77, 88, 99))
    _png(root / "samples" / "abs.png", (1, 2, 3))
    (root / "samples" / "link.png").symlink_to(linked)
    names = ["../../secret.png", "samples/link.png", "samples/in.png", str(root / "samples" / "abs.png"),
             str(secret), "../../junk.png", "../../absent.png"]
    (root / "samples.jsonl").write_text("".join(json.dumps({"file_name": n, "prompt": f"p{i}"}) + "\n"
                                                for i, n in enumerate(names)))
    page = build_report([root])
    b64 = {p.name: base64.b64encode(p.read_bytes()).decode() for p in (secret, linked, root / "samples" / "in.png",
                                                                       root / "samples" / "abs.png")}
    assert b64["secret.png"] not in page and b64["linked.png"] not in page
    srcs = img_srcs(page)
    assert len(srcs) == 2 and b64["in.png"] in srcs[0] and b64["abs.png"] in srcs[1]  # in-run, relative or absolute
    assert "run: 5 outside the run" in page and page.count("skipped: outside the run") == 5
    alias = tmp_path / "alias"  # a run directory reached through a symlink is still the run
    alias.symlink_to(root)
    page = build_report([alias])
    assert len(img_srcs(page)) == 2 and "alias: 5 outside the run" in page

    demo = diffusion_run(tmp_path / "demo")  # in a before/after grid: the pair stays, its outside image does not
    rows = (demo / "dpo" / "eval" / "samples.jsonl").read_text().splitlines()
    rows[0] = json.dumps({**json.loads(rows[0]), "file_name": "../../../secret.png"})
    (demo / "dpo" / "eval" / "samples.jsonl").write_text("\n".join(rows) + "\n")
    page = build_report([demo])
    assert b64["secret.png"] not in page and len(img_srcs(page)) == 5
    assert "dpo: 1 outside the run" in page and "base: " not in page.split("Images skipped")[1].split("</p>")[0]


def test_cli_report(tmp_path, capsys):
    root = diffusion_run(tmp_path / "run")
    main(["report", str(root)])
    assert (root / "report.html").is_file() and "wrote" in capsys.readouterr().out
    main(["report", str(root), str(root), "--out", str(tmp_path / "x" / "r.html"), "--smooth", "0.6"])
    assert "<h3>Side by side</h3>" in (tmp_path / "x" / "r.html").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="report: .*nothing to report"):
        main(["report", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match=r"smoothing weight must lie in \[0, 1\)"):
        main(["report", str(root), "--smooth", "1"])


# --- a user's own runs: sample folders, training runs of two families, an `eval compare` results file -----------

def training_run(folder: Path, method: str, steps: list[int], loss) -> None:
    """A trainer output folder: config.yaml naming the method, metrics.jsonl with `loss(step)`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(f"method: {method}\ntrain:\n  max_steps: {steps[-1]}\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": loss(s), "lr": 1e-4,
                                                              "elapsed_s": s / 10}) + "\n" for s in steps))


def compare_results(path: Path, a: Path, b: Path) -> None:
    """A results file shaped as evals/images.compare_image_folders writes it."""
    t = TaskResult({"win_rate": 0.625, "mean_diff": 0.0123}, {"win_rate": True, "mean_diff": True}, n_original=4,
                   config={"a": str(a), "b": str(b), "scorer": "clipscore", "bad_rows": "skip"},
                   extra={"wins": 5, "ties": 0, "losses": 3, "win_rate_ci95": [0.31, 0.9],
                          "mean_diff_ci95": [-0.004, 0.0291], "mean_a": [0.3, 0.28, 0.32],
                          "mean_b": [0.29, 0.27, 0.31], "n_prompts": 4, "n_boot": 2000, "boot_seed": 0})
    write_results(path, {"compare_clipscore": t}, model="clip <tiny>")


def user_runs(root: Path) -> Path:
    """Two plain sample folders (same prompts and seeds; |Δ score| 0.1, 0.7, 0.0, 0.4 for p0..p3), a diffusion run
    with 60 logged steps (loss around 4), an MLLM run of 10 steps logged once (loss 0.7), a compare file."""
    a_scores, b_scores = [0.5, 0.9, 0.3, 0.8], [0.4, 0.2, 0.3, 0.4]
    for name, scores, colour in (("sample_dpo", a_scores, (0, 0, 200)), ("sample_base", b_scores, (200, 0, 0))):
        folder = root / name
        folder.mkdir(parents=True)
        rows = []
        for i, sc in enumerate(scores):
            _png(folder / f"{i}.png", tuple(min(255, c + 40 * i) for c in colour))
            rows.append({"file_name": f"{i}.png", "prompt": f"p{i} {EVIL}" if i == 1 else f"p{i}", "seed": i,
                         "scores": {"clipscore": sc}})
        (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    training_run(root / "train_diffusion", "diffusion_dpo", list(range(10, 610, 10)),
                 lambda s: 4 + 3 * math.sin(s / 37) + (s % 7) / 3)
    training_run(root / "train_mllm", "mllm_dpo", [10], lambda s: 0.7)
    compare_results(root / "sample_base" / "compare_clipscore.json", root / "sample_dpo", root / "sample_base")
    return root


def svgs(page: str, cls: str = "chart") -> list[str]:
    return re.findall(rf'<svg class="{cls}[ "].*?</svg>', page, re.S)


def test_user_runs_legends_families_and_few_points(tmp_path):
    root = user_runs(tmp_path / "runs")
    run = discover(root)
    assert sorted((x.name, x.family) for x in run.logs) == [("train_diffusion", "diffusion"), ("train_mllm", "mllm")]
    assert sorted(st.label for st in run.sample_sets) == ["sample_base", "sample_dpo"]
    page = build_report([root])
    assert "(top level)" not in page
    losses = [s for s in svgs(page) if 'aria-label="loss ·' in s]
    assert len(losses) == 2  # diffusion loss (0-8) and MLLM loss (0.7) never share an axis
    diffusion = next(s for s in losses if "loss · diffusion" in s)
    mllm = next(s for s in losses if "loss · mllm" in s)
    assert "train_diffusion</text>" in diffusion and "train_mllm" not in diffusion
    assert "train_mllm</text>" in mllm and "train_diffusion" not in mllm
    assert mllm.count('<circle class="pt"') == 1 and ">0.7</text>" in mllm  # the one logged point: marked, labelled
    assert 'stroke-opacity="0.25"' in diffusion and diffusion.count("<polyline") == 2  # 60 points: EMA over faint raw
    assert "EMA 0.6 (raw faint behind)" in page
    one_run = build_report([root / "train_mllm"])  # a single run: the legend is the folder's own name
    assert "train_mllm</text>" in one_run and "(top level)" not in one_run


def test_user_runs_forest_win_rate_ci_and_page_order(tmp_path):
    root = user_runs(tmp_path / "runs")
    diffusion_run(root / "demo")  # adds 2 accuracy gains and 1 win rate
    page = build_report([root])
    assert "<td class=l>win_rate</td><td>0.625</td><td>N/A</td><td>[0.31, 0.9]</td><td>↑</td>" in page
    assert "<td class=l>mean_diff</td><td>0.0123</td><td>N/A</td><td>[-0.004, 0.0291]</td>" in page
    forests = svgs(page, "chart forest")
    titles = [re.search(r'aria-label="([^"]*)"', f).group(1) for f in forests]
    assert titles == ["Diffusion demo: attribute accuracy gain vs base, points [95 % CI]",
                      "Win rate vs the baseline, % [95 % CI] (50 = no preference)",
                      "clipscore: mean difference A − B [95 % CI]"]
    rows = [f.count('<g class="row">') for f in forests]
    assert rows == [2, 2, 1]  # colour + correct; demo + compare win rates; one mean difference
    assert "+5.0 [+1.0, +9.0]" in forests[0] and "+2.0 [-3.0, +7.0]" in forests[0]
    assert "53.3 [49.8, 56.8]" in forests[1] and "62.5 [31.0, 90.0]" in forests[1]
    assert "+0.0123 [-0.004, +0.0291]" in forests[2] and "runs/sample_dpo vs runs/sample_base" in forests[2]
    assert forests[0].count('class="ref"') == 1 and 'stroke="#1f4e9c"' in forests[0]  # CI excluding 0: dark
    order = [page.index(x) for x in ('id="headline"', "chart forest", 'id="samples"', 'class="pair"',
                                     'id="training"', 'aria-label="loss ·')]
    assert order == sorted(order)  # headline results, then sample grids, then training curves


def test_paired_grid_of_two_sample_folders_by_disagreement(tmp_path):
    root = user_runs(tmp_path / "runs")
    page = build_report([root], max_images=6)
    grid = page.split("<h3>sample_base vs sample_dpo</h3>")[1]
    caps = re.findall(r'<div class="cap">(p\d)', grid)
    assert caps == ["p1", "p3", "p0"]  # |Δ clipscore| 0.7, 0.4, 0.1 (0.0 for p2 cut by max_images 6 = 3 blocks)
    assert "|Δ clipscore| 0.7" in grid and "Showing 3 of 4 paired" in grid
    assert "p1 &lt;script&gt;" in grid and "<script>" not in page
    assert "Samples: sample_" not in page  # both folders are in the paired grid, not also alone
    for folder in ("sample_dpo", "sample_base"):  # without scores: ordered by pixel difference
        rows = [json.loads(x) for x in (root / folder / "samples.jsonl").read_text().splitlines()]
        (root / folder / "samples.jsonl").write_text("".join(json.dumps({**r, "scores": {}}) + "\n" for r in rows))
    _png(root / "sample_dpo" / "2.png", (255, 255, 255))  # p2 now differs most from the base's dark red
    grid = build_report([root], max_images=2).split("<h3>sample_base vs sample_dpo</h3>")[1]
    assert re.findall(r'<div class="cap">(p\d)', grid) == ["p2"] and "pixel difference" in grid


# --- real headless Chromium ---------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def browser_check(page_path: Path) -> dict:
    """Load a file in headless Chromium (fresh profile) and report console errors, page errors, requests that
    are not the file itself or data: URIs, images not fully decoded, and the SVG charts' bounding boxes."""
    from playwright.sync_api import sync_playwright

    found = {"console_errors": [], "page_errors": [], "requests": []}
    profile = tempfile.mkdtemp(prefix="mmalign-chromium-")
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = ctx.new_page()
            page.on("console", lambda m: m.type == "error" and found["console_errors"].append(m.text))
            page.on("pageerror", lambda e: found["page_errors"].append(str(e)))
            page.on("request", lambda r: r.url.startswith(("file:", "data:")) or found["requests"].append(r.url))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            found["images"] = page.evaluate(
                "[...document.images].map(i => ({complete: i.complete, width: i.naturalWidth}))")
            found["charts"] = page.evaluate("[...document.querySelectorAll('svg.chart')].map(s => {"
                                            "const b = s.getBoundingClientRect(); return [b.width, b.height]; })")
            found["lines"] = page.evaluate("[...document.querySelectorAll('svg.chart polyline, svg.chart circle')]"
                                           ".map(l => { const b = l.getBBox(); return b.width + b.height; })")
            found["text"] = page.inner_text("body")
            ctx.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return found


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: `make test` installs Debian's "
                    "chromium package (as root); without it the report's browser test cannot run")
def test_report_in_headless_chromium(tmp_path):
    out = write_report([full_run(tmp_path / "a"), diffusion_run(tmp_path / "b")], tmp_path / "report.html")
    found = browser_check(out)
    assert found["console_errors"] == [] and found["page_errors"] == [] and found["requests"] == []
    assert len(found["images"]) == 12 and all(i["complete"] and i["width"] > 0 for i in found["images"])
    assert len(found["charts"]) == 3 + 3 and all(w > 0 and h > 0 for w, h in found["charts"])  # curves, forests
    assert len(found["lines"]) >= 6 and all(v > 0 for v in found["lines"])
    assert EVIL in found["text"]  # user text shown as text, not run as markup

    # the same check flags a broken page: a script error, an image that does not decode, an outside request
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
                   '<img src="http://192.0.2.1/x.png"><script>console.error("boom"); undefined_fn();</script>'
                   '</body></html>')
    found = browser_check(bad)
    assert any("boom" in e for e in found["console_errors"]) and found["page_errors"]
    assert found["requests"] == ["http://192.0.2.1/x.png"]
    assert [i["width"] for i in found["images"]] == [0, 0] and found["charts"] == []
