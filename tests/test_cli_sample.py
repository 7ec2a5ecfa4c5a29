"""`mmalign sample` on tiny SD1.5 and SDXL pipelines, a LoRA export of a real training run (base from its
metadata), a video export, its one-line errors, and sample -> `eval compare`."""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmalign.cli import main
from mmalign.diffusion.load_for_sampling import load_for_sampling
from mmalign.diffusion.lora import EXPORT_INFO, LORA_WEIGHTS
from mmalign.evals.video_folder import read_video_samples

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle", "two blue squares"]


def sample(model, out, *extra):
    args = ["sample", "--out", str(out), "--steps", "2", "--device", "cpu"]
    args += [a for p in PROMPTS for a in ("--prompt", p)]
    main(args + (["--model", str(model)] if model is not None else []) + list(extra))
    return [json.loads(line) for line in open(out / "samples.jsonl")]


def pixels(out, rows):
    return [np.asarray(Image.open(out / r["file_name"]), dtype=np.int16) for r in rows]


@pytest.fixture(scope="module")
def base_samples(tiny_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "samples"
    return out, sample(tiny_sd_dir, out)


@pytest.fixture(scope="module")
def lora_run(tiny_sd_dir, shapeworld_folder, tmp_path_factory):
    """A real 2-step diffusion_sft run with LoRA: runs/x/final holds the adapter and its export metadata."""
    root = tmp_path_factory.mktemp("lora")
    cfg = root / "r.yaml"
    cfg.write_text(yaml.safe_dump({"method": "diffusion_sft", "output_dir": str(root / "run"),
                                   "train": {"max_steps": 2, "batch_size": 4, "lr": 0.05},
                                   "model": {"pretrained": str(tiny_sd_dir), "lora_rank": 4},
                                   "data": {"path": str(shapeworld_folder)}}))
    main(["train", str(cfg)])
    return root / "run"


def test_sd15_pipeline_samples_a_folder_with_fixed_seeds(base_samples, tiny_sd_dir, tmp_path):
    out, rows = base_samples
    assert [(r["prompt"], r["seed"]) for r in rows] == [(PROMPTS[0], 0), (PROMPTS[1], 1)]
    assert all((out / r["file_name"]).is_file() for r in rows) and (out / "grid.png").is_file()
    again = sample(tiny_sd_dir, tmp_path / "again", "--seed", "0")  # same prompts and seeds: same images
    assert all(np.array_equal(a, b) for a, b in zip(pixels(out, rows), pixels(tmp_path / "again", again)))


def test_sdxl_pipeline_samples(tiny_sdxl_dir, tmp_path):
    rows = sample(tiny_sdxl_dir, tmp_path / "xl", "--per-prompt", "2", "--seed", "5")
    assert [(r["prompt"], r["seed"]) for r in rows] == [(PROMPTS[0], 5), (PROMPTS[0], 6), (PROMPTS[1], 7),
                                                        (PROMPTS[1], 8)]
    ims = [Image.open(tmp_path / "xl" / r["file_name"]) for r in rows]
    assert all(im.size == (32, 32) for im in ims)



def test_sdxl_lora_export_samples_on_its_recorded_base(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from mmalign.diffusion.lora import add_lora, save_unet_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    add_lora(unet, rank=2)
    save_unet_lora(StableDiffusionXLPipeline, unet, str(tmp_path / "final"), base=str(tiny_sdxl_dir))
    pipe = load_for_sampling(tmp_path / "final")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and pipe.get_list_adapters() == {"unet": ["default_0"]}
    assert [r["seed"] for r in sample(tmp_path / "final", tmp_path / "xl")] == [0, 1]


def test_lora_export_names_its_base_and_samples_without_base(lora_run, tiny_sd_dir, base_samples, tmp_path):
    final = lora_run / "final"
    assert (final / LORA_WEIGHTS).is_file() and not (final / "model_index.json").exists()
    info = json.loads((final / EXPORT_INFO).read_text())
    assert info["kind"] == "lora" and info["base"] == str(tiny_sd_dir.resolve())
    pipe = load_for_sampling(final)  # no base given: the export's metadata names it
    assert pipe.get_list_adapters() == {"unet": ["default_0"]} and type(pipe).__name__ == "StableDiffusionPipeline"
    rows = sample(final, tmp_path / "lora")
    base_out, base_rows = base_samples
    assert [(r["prompt"], r["seed"]) for r in rows] == [(r["prompt"], r["seed"]) for r in base_rows]
    diff = [np.abs(a - b).max() for a, b in zip(pixels(tmp_path / "lora", rows), pixels(base_out, base_rows))]
    assert max(diff) > 0, "the trained LoRA left every sample unchanged"
    # the same LoRA through --lora (base from the metadata) and through --model BASE --lora: the same images
    for extra, model in ((["--lora", str(final)], None), (["--lora", str(final)], tiny_sd_dir)):
        again = sample(model, tmp_path / "again", *extra)
        assert all(np.array_equal(a, b) for a, b in zip(pixels(tmp_path / "lora", rows),
                                                        pixels(tmp_path / "again", again)))


def test_video_export_samples_clips_eval_videos_reads(tiny_sd_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from mmalign.video.sampling import save_video_model
    from mmalign.video.temporal import MotionSpec, inflate

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    save_video_model(tiny_sd_dir, inflate(unet, spec=MotionSpec(heads=4)), tmp_path / "final")
    rows = sample(tmp_path / "final", tmp_path / "clips", "--frames", "3")
    assert [r["file_name"] for r in rows] == ["samples/00000.gif", "samples/00001.gif"]
    clips, captions, _, report = read_video_samples(tmp_path / "clips")
    assert captions == PROMPTS and report.kept == 2 and [c.shape[0] for c in clips] == [3, 3]


def test_bad_inputs_are_one_line_errors(tiny_sd_dir, lora_run, tmp_path):
    def fails(match, model, *extra):
        with pytest.raises(SystemExit, match="^error: " + match):
            sample(model, tmp_path / "o", *extra)

    (tmp_path / "empty").mkdir()
    fails(r"--model .*empty: not a pipeline directory \(model_index.json\), a LoRA export", tmp_path / "empty")
    fails("--model .*nowhere: no such directory", tmp_path / "nowhere")
    fails("--base applies to a LoRA export only", tiny_sd_dir, "--base", str(tiny_sd_dir))
    fails("--lora .*: not a LoRA export", tiny_sd_dir, "--lora", str(tiny_sd_dir))
    orphan = tmp_path / "orphan"  # the adapter alone, copied away from its run and without its metadata
    orphan.mkdir()
    shutil.copy(lora_run / "final" / LORA_WEIGHTS, orphan)
    fails("--lora .*orphan: the LoRA export does not name its base .*--base", None, "--lora", str(orphan))
    moved = tmp_path / "moved"  # metadata naming a base that is gone
    shutil.copytree(lora_run / "final", moved)
    (moved / EXPORT_INFO).write_text(json.dumps({"kind": "lora", "base": str(tmp_path / "gone")}))
    fails("--lora .*moved: its base cannot be loaded.*--base", moved)
    with pytest.raises(SystemExit, match="^error: give prompts"):
        main(["sample", "--model", str(tiny_sd_dir), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    rows = sample(moved, tmp_path / "given", "--base", str(tiny_sd_dir))  # --base stands in for the lost one
    assert [r["seed"] for r in rows] == [0, 1]



def test_an_export_without_metadata_takes_its_base_from_the_run_config(lora_run, tiny_sd_dir, tmp_path):
    shutil.copytree(lora_run / "final", tmp_path / "run/final")
    (tmp_path / "run/final" / EXPORT_INFO).unlink()  # as exports written before the metadata existed
    (tmp_path / "run/config.yaml").write_text(yaml.safe_dump({"model": {"pretrained": str(tiny_sd_dir)}}))
    pipe = load_for_sampling(lora=tmp_path / "run/final")
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}
    assert pipe.config._name_or_path == str(tiny_sd_dir)


def test_sample_then_eval_compare_then_report(base_samples, lora_run, tiny_sdxl_dir, tmp_path):
    from mmalign.evals.clip_backbone import build_clip, save_backbone

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                           "head_width": 16},
           "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    clip = save_backbone(build_clip(cfg), cfg, tmp_path / "clip")
    sample(lora_run / "final", tmp_path / "lora")
    main(["eval", "compare", str(base_samples[0]), str(tmp_path / "lora"), "--model", str(clip),
          "--out", str(tmp_path / "c.json")])
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["n-samples"]["compare_clipscore"] == {"original": 2, "effective": 2}
    # an SDXL pipeline on the same prompts and seeds, compared likewise; then one report over all three folders
    sample(tiny_sdxl_dir, tmp_path / "sdxl")
    main(["eval", "compare", str(tmp_path / "sdxl"), str(base_samples[0]), "--model", str(clip)])
    assert any((tmp_path / "sdxl").glob("compare_clipscore_vs_*.json"))  # written into the candidate's folder
    (tmp_path / "c.json").rename(tmp_path / "lora" / "compare_lora.json")
    main(["report", str(base_samples[0]), str(tmp_path / "lora"), str(tmp_path / "sdxl"),
          "--out", str(tmp_path / "report.html")])
    html = (tmp_path / "report.html").read_text()
    assert "Gains and win rates with 95 % CIs" in html and html.count("<svg") >= 1
    assert html.count(" vs ") >= 2 and html.count("<img") >= 6  # paired grids of the sample folders
