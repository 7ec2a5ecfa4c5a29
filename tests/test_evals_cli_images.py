"""`mmalign eval images` / `mmalign eval compare` on tiny sample folders scored by a tiny random open_clip."""
import argparse
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.cli import build_parser, main
from mmalign.diffusion.sampling import save_samples
from mmalign.evals.clip_backbone import build_clip, save_backbone
from mmalign.evals.clip_scorers import SHIPPED_CLIP, AestheticHead, make_scorer
from mmalign.evals.results import read_results
from mmalign.core.stats import paired_gain_ci, win_rate

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CFG = {"embed_dim": 16,
            "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
            "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a cyan square", "three red circles"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_backbone(build_clip(TINY_CFG), TINY_CFG, tmp_path_factory.mktemp("clip") / "tiny")


def random_images(n, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(n)]


def folder(path, prompts=PROMPTS, seeds=None, image_seed=0):
    ims = random_images(len(prompts), image_seed)
    save_samples(path, ims, prompts, seeds if seeds is not None else list(range(len(prompts))))
    return path, ims


def sample_rows(results_path, task):
    return [json.loads(l) for l in open(results_path.with_name(f"{results_path.stem}_samples_{task}.jsonl"))]


def test_eval_images_matches_the_python_api(clip_dir, tmp_path, capsys):
    run, ims = folder(tmp_path / "run")
    main(["eval", "images", str(run), "--scorer", "clipscore", "--model", str(clip_dir)])
    out = run / "eval_clipscore.json"
    res = read_results(out)
    expected = make_scorer("clipscore", clip_dir).score(ims, PROMPTS)
    rows = sample_rows(out, "images_clipscore")
    assert [r["clipscore"] for r in rows] == pytest.approx(expected, abs=1e-5)
    assert [(r["prompt"], r["seed"]) for r in rows] == list(zip(PROMPTS, range(5)))
    assert res["tasks"]["images_clipscore"]["clipscore"] == pytest.approx(np.mean(expected), abs=1e-5)
    doc = res["doc"]
    sha = hashlib.sha256((clip_dir / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert doc["mmalign"]["provenance"]["backbone"]["weights_sha256"] == sha
    lo, hi = doc["mmalign"]["extra"]["images_clipscore"]["ci95"]
    assert lo <= np.mean(expected) <= hi and doc["n-samples"]["images_clipscore"] == {"original": 5, "effective": 5}
    assert "clipscore:" in capsys.readouterr().out
    # the run's samples/ folder itself gives the same scores
    main(["eval", "images", str(run / "samples"), "--scorer", "clipscore", "--model", str(clip_dir),
          "--out", str(tmp_path / "again.json")])
    assert [r["clipscore"] for r in sample_rows(tmp_path / "again.json", "images_clipscore")] == \
        [r["clipscore"] for r in rows]


def test_bad_rows_are_counted_skips_or_errors(clip_dir, tmp_path):
    run, _ = folder(tmp_path / "run")
    (run / "samples/00001.png").unlink()
    (run / "samples/00003.png").write_bytes(b"not a png")
    with open(run / "samples.jsonl", "a") as f:
        f.write('{"file_name": "samples/00000.png", "seed": 9}\n{broken\n')
    main(["eval", "images", str(run), "--model", str(clip_dir), "--out", str(tmp_path / "r.json")])
    doc = read_results(tmp_path / "r.json")["doc"]
    assert doc["n-samples"]["images_clipscore"] == {"original": 7, "effective": 3}
    skipped = doc["mmalign"]["extra"]["images_clipscore"]["rows"]["skipped"]
    assert skipped == {"image file not found": 1, "unreadable image": 1, "missing or non-string prompt": 1,
                       "invalid JSON (Expecting property name enclosed in double quotes)": 1}
    with pytest.raises(SystemExit, match=r"^error: .*samples.jsonl:2: image file not found"):
        main(["eval", "images", str(run), "--model", str(clip_dir), "--bad-rows", "error"])


def test_compare_wtl_win_rate_and_diff(clip_dir, tmp_path, capsys):
    a, a_ims = folder(tmp_path / "a", image_seed=1)
    b, b_ims = folder(tmp_path / "b", image_seed=2)
    main(["eval", "compare", str(a), str(b), "--scorer", "pickscore", "--model", str(clip_dir),
          "--out", str(tmp_path / "cmp.json"), "--n-boot", "1000"])
    scorer = make_scorer("pickscore", clip_dir)
    sa, sb = scorer.score(a_ims, PROMPTS), scorer.score(b_ims, PROMPTS)
    doc = read_results(tmp_path / "cmp.json")["doc"]
    extra = doc["mmalign"]["extra"]["compare_pickscore"]
    wins = sum(x > y for x, y in zip(sa, sb))
    assert (extra["wins"], extra["ties"], extra["losses"]) == (wins, 0, 5 - wins)
    wr = win_rate(sa, sb, 1000, 0)
    assert doc["results"]["compare_pickscore"]["win_rate,none"] == pytest.approx(wins / 5)
    assert extra["win_rate_ci95"] == pytest.approx(wr["ci95"])
    diff, lo, hi = paired_gain_ci(sa, sb, 1000, 0)
    assert doc["results"]["compare_pickscore"]["mean_diff,none"] == pytest.approx(diff, abs=1e-5)
    assert extra["mean_diff_ci95"] == pytest.approx([lo, hi], abs=1e-5)
    printed = capsys.readouterr().out
    assert "W/T/L" in printed and "A - B" in printed


def test_compare_identical_runs_tie_and_prompts_are_the_unit(clip_dir, tmp_path):
    prompts = [p for p in PROMPTS[:3] for _ in range(2)]  # 3 prompts x 2 seeds
    a, _ = folder(tmp_path / "a", prompts)
    b, _ = folder(tmp_path / "b", prompts)
    main(["eval", "compare", str(a), str(b), "--model", str(clip_dir), "--out", str(tmp_path / "c.json")])
    doc = read_results(tmp_path / "c.json")["doc"]
    extra = doc["mmalign"]["extra"]["compare_clipscore"]
    assert (extra["wins"], extra["ties"], extra["losses"], extra["n_prompts"]) == (0, 3, 0, 3)
    assert doc["results"]["compare_clipscore"]["win_rate,none"] == 0.5 and extra["win_rate_ci95"] == [0.5, 0.5]
    assert len(sample_rows(tmp_path / "c.json", "compare_clipscore")) == 6


def test_compare_skips_a_pair_whose_image_is_missing_in_either_run(clip_dir, tmp_path):
    a, _ = folder(tmp_path / "a", image_seed=1)
    b, _ = folder(tmp_path / "b", image_seed=2)
    (a / "samples/00000.png").unlink()
    (b / "samples/00004.png").unlink()
    main(["eval", "compare", str(a), str(b), "--model", str(clip_dir), "--out", str(tmp_path / "c.json")])
    doc = read_results(tmp_path / "c.json")["doc"]
    assert doc["n-samples"]["compare_clipscore"] == {"original": 5, "effective": 3}
    assert [r["seed"] for r in sample_rows(tmp_path / "c.json", "compare_clipscore")] == [1, 2, 3]
    with pytest.raises(SystemExit, match="^error: .*image file not found"):
        main(["eval", "compare", str(a), str(b), "--model", str(clip_dir), "--bad-rows", "error"])


def test_compare_refuses_other_prompts_or_seeds(clip_dir, tmp_path):
    a, _ = folder(tmp_path / "a")
    b, _ = folder(tmp_path / "b", seeds=[0, 1, 7, 3, 4])
    with pytest.raises(SystemExit, match=r"^error: row 3 differs: .*'a green triangle' seed 2.*'a green triangle' "
                                         r"seed 7"):
        main(["eval", "compare", str(a), str(b), "--model", str(clip_dir)])
    (b / "samples/00002.png").unlink()  # a row skipped for its image still has to match
    with pytest.raises(SystemExit, match="^error: row 3 differs"):
        main(["eval", "compare", str(a), str(b), "--model", str(clip_dir)])
    c, _ = folder(tmp_path / "c", PROMPTS[:4])
    with pytest.raises(SystemExit, match="^error: .* has 5 rows but .* has 4"):
        main(["eval", "compare", str(a), str(c), "--model", str(clip_dir)])
    with pytest.raises(SystemExit, match="at least 1000"):
        main(["eval", "compare", str(a), str(a), "--model", str(clip_dir), "--n-boot", "200"])


def test_aesthetic_and_hpsv2_through_the_cli(clip_dir, tmp_path):
    run, ims = folder(tmp_path / "run")
    torch.manual_seed(1)
    torch.save(AestheticHead(16).state_dict(), tmp_path / "head.pth")
    main(["eval", "images", str(run), "--scorer", "aesthetic", "--model", str(clip_dir), "--head",
          str(tmp_path / "head.pth"), "--out", str(tmp_path / "aes.json")])
    doc = read_results(tmp_path / "aes.json")["doc"]
    assert doc["mmalign"]["provenance"]["head"]["weights_sha256"] == hashlib.sha256(
        (tmp_path / "head.pth").read_bytes()).hexdigest()
    (tmp_path / "cfg.json").write_text(json.dumps(TINY_CFG))
    torch.save({"state_dict": build_clip(TINY_CFG).state_dict()}, tmp_path / "hps.pt")
    main(["eval", "images", str(run), "--scorer", "hpsv2", "--model", str(tmp_path / "hps.pt"), "--arch",
          str(tmp_path / "cfg.json"), "--out", str(tmp_path / "hps.json")])
    cos = [r["hpsv2"] for r in sample_rows(tmp_path / "hps.json", "images_hpsv2")]
    assert len(cos) == 5 and all(-1 <= c <= 1 for c in cos)
    with pytest.raises(SystemExit, match="not found"):
        main(["eval", "images", str(run), "--model", str(tmp_path / "missing_dir")])


@pytest.mark.skipif(not (SHIPPED_CLIP / "open_clip_model.safetensors").is_file(), reason="shipped CLIP not built")
def test_clipscore_without_model_uses_the_shipped_clip_and_says_so(tmp_path, capsys):
    from mmalign.datasets.shapeworld import render_scene, sample_scenes

    scenes = sample_scenes(5, 4, split="heldout")
    save_samples(tmp_path / "run", [render_scene(s) for s in scenes], [s.caption for s in scenes], [0, 1, 2, 3])
    main(["eval", "images", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    assert printed.startswith(f"note: clipscore without --model scores with the shipped ShapeWorld CLIP "
                              f"({SHIPPED_CLIP}), meaningful only for ShapeWorld prompts")
    doc = read_results(tmp_path / "run/eval_clipscore.json")["doc"]
    assert doc["config"]["model"] == str(SHIPPED_CLIP) and doc["results"]["images_clipscore"]["clipscore,none"] > 0
    assert "only for ShapeWorld prompts" in doc["mmalign"]["extra"]["images_clipscore"]["model_notice"]
    # chosen explicitly (by name or path): the same scores, no notice
    for model in ("shapeworld", str(SHIPPED_CLIP)):
        main(["eval", "images", str(tmp_path / "run"), "--model", model, "--out", str(tmp_path / "x.json")])
        assert "note:" not in capsys.readouterr().out
        explicit = read_results(tmp_path / "x.json")["doc"]
        assert "model_notice" not in explicit["mmalign"]["extra"]["images_clipscore"]
        assert explicit["results"] == doc["results"] and explicit["config"]["model"] == str(SHIPPED_CLIP)


@pytest.mark.parametrize("args, named", [
    (["--scorer", "pickscore"], "pickscore needs its published weights, yuvalkirstain/PickScore_v1"),
    (["--scorer", "hpsv2"], "hpsv2 needs its published weights: pass --model HPS_v2.1_compressed.pt"),
    (["--scorer", "aesthetic", "--model", "shapeworld"], "aesthetic needs the LAION aesthetic predictor head: "
                                                        "pass --head sac+logos+ava1-l14-linearMSE.pth"),
    (["--scorer", "aesthetic", "--head", "h.pth"], "aesthetic needs its backbone, OpenAI CLIP ViT-L/14: pass --model"),
    (["--scorer", "aesthetic"], "aesthetic needs the LAION aesthetic predictor head: pass --head sac+logos+ava1-l14-"
                                "linearMSE.pth (christophschuhmann/improved-aesthetic-predictor), an MLP on CLIP "
                                "ViT-L/14 image embeddings; aesthetic needs its backbone, OpenAI CLIP ViT-L/14: "
                                "pass --model openai"),
])
def test_scorers_without_their_published_weights_refuse(tmp_path, args, named):
    run, _ = folder(tmp_path / "run")
    for verb in (["images", str(run)], ["compare", str(run), str(run)]):
        with pytest.raises(SystemExit) as e:
            main(["eval", *verb, *args])
        assert str(e.value.code).startswith(f"error: {named}") and "\n" not in str(e.value.code)
    assert not list(run.glob("*.json"))


def test_compare_counts_kept_rows_and_names_the_ci_unit(clip_dir, tmp_path, capsys):
    a, _ = folder(tmp_path / "a", image_seed=1)
    b, _ = folder(tmp_path / "b", image_seed=2)
    (a / "samples/00000.png").unlink()
    (b / "samples/00004.png").unlink()
    main(["eval", "compare", str(a), str(b), "--model", str(clip_dir), "--out", str(tmp_path / "c.json")])
    extra = read_results(tmp_path / "c.json")["doc"]["mmalign"]["extra"]["compare_clipscore"]
    pair_skipped = "its pair in the other folder was skipped"
    assert extra["rows_a"]["kept"] == extra["rows_b"]["kept"] == 3
    assert extra["rows_a"]["skipped"] == extra["rows_b"]["skipped"] == {"image file not found": 1, pair_skipped: 1}
    assert extra["rows_a"]["examples"][pair_skipped] == [f"{a / 'samples.jsonl'}:5"]
    assert extra["ci_unit"].startswith("95 % CI over prompts (paired")
    printed = capsys.readouterr().out
    assert "95 % CI over prompts (paired" in printed and "W/T/L" in printed
    # all rows good: kept is every row
    main(["eval", "compare", str(b), str(b), "--model", str(clip_dir), "--out", str(tmp_path / "same.json")])
    same = read_results(tmp_path / "same.json")["doc"]["mmalign"]["extra"]["compare_clipscore"]
    assert same["rows_a"] == same["rows_b"] == {"total": 5, "kept": 4, "skipped": {"image file not found": 1},
                                                "examples": {"image file not found": [f"{b / 'samples.jsonl'}:5"]}}


def test_several_candidates_against_one_baseline_keep_their_results(clip_dir, tmp_path, capsys):
    base, _ = folder(tmp_path / "base", image_seed=0)
    written = {}
    for name, image_seed in (("dpo", 1), ("cca", 2)):
        cand, _ = folder(tmp_path / name, image_seed=image_seed)
        main(["eval", "compare", str(cand), str(base), "--scorer", "pickscore", "--model", str(clip_dir)])
        written[name] = cand / "compare_pickscore_vs_base.json"
        assert f"results: {written[name]}" in capsys.readouterr().out
    assert not list(base.glob("compare_*"))
    docs = {k: read_results(p)["doc"] for k, p in written.items()}
    assert {k: d["configs"]["compare_pickscore"]["a"] for k, d in docs.items()} == \
        {"dpo": str(tmp_path / "dpo"), "cca": str(tmp_path / "cca")}
    assert docs["dpo"]["results"] != docs["cca"]["results"]


def test_eval_images_names_the_ci_unit(clip_dir, tmp_path, capsys):
    run, _ = folder(tmp_path / "run")
    main(["eval", "images", str(run), "--model", str(clip_dir)])
    printed = capsys.readouterr().out
    assert ("(95 % CI over prompts, percentile bootstrap (a prompt's images resampled together); 5 images, 5/5 rows "
            "kept)") in printed
    assert "note:" not in printed
    extra = read_results(run / "eval_clipscore.json")["doc"]["mmalign"]["extra"]["images_clipscore"]
    assert extra["ci_unit"] == "95 % CI over prompts, percentile bootstrap (a prompt's images resampled together)"


def test_module_imports_without_torch_and_verbs_have_help(capsys):
    r = subprocess.run([sys.executable, "-c", "import sys, mmalign.evals.cli_images; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr
    for verb in ("images", "compare"):
        with pytest.raises(SystemExit):
            main(["eval", verb, "--help"])
        assert "--scorer" in capsys.readouterr().out
    evals = _subparsers(build_parser())["eval"]
    for verb in ("images", "compare"):
        undocumented = [a.dest for a in _subparsers(evals)[verb]._actions if not a.help]
        assert undocumented == [], verb


def _subparsers(parser) -> dict:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
