"""Issue 16, item 3: long steps outside training show a progress bar with a count (and tqdm's ETA), and the CLI's
status lines are line-buffered, so they appear as they happen when output goes to a file."""
import subprocess
import sys
from types import SimpleNamespace

import torch
from diffusers import StableDiffusionPipeline

from mmalign.diffusion.onpolicy import make_onpolicy_pairs
from mmalign.diffusion.sampling import sample_images
from mmalign.mllm.refcache import cached_reference_logps


def test_sampling_and_pair_making_show_bars(tiny_sd_dir, tmp_path, capsys):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    sample_images(pipe, ["a red circle"] * 3, [0, 1, 2], steps=2, batch_size=2, desc="held-out samples")
    err = capsys.readouterr().err
    assert "held-out samples" in err and "3/3" in err and "img" in err
    def red(image, prompt):
        return float(image.getpixel((0, 0))[0])
    make_onpolicy_pairs(pipe, ["a red circle", "a blue square"], 2, tmp_path / "p", red, steps=2)
    err = capsys.readouterr().err
    assert "on-policy samples" in err and "4/4" in err and "score samples" in err


def test_reference_log_probs_show_a_bar_that_counts_cached_rows(tmp_path, capsys):
    rows = [SimpleNamespace(index=i) for i in range(5)]
    calls = []

    def compute(batch):
        calls.append(len(batch))
        return torch.zeros(len(batch), 2)
    cached_reference_logps(str(tmp_path), {"k": 1}, rows, compute, batch_size=2, log=lambda *_: None)
    assert calls == [2, 2, 1] and "reference log-probs" in capsys.readouterr().err
    cached_reference_logps(str(tmp_path), {"k": 1}, rows, compute, batch_size=2, log=lambda *_: None)
    assert calls == [2, 2, 1] and "5/5" in capsys.readouterr().err  # all from disk, still counted


def test_cli_output_is_line_buffered_when_redirected(tmp_path):
    code = ("import sys; from mmalign.cli import main; main(['list']); "
            "print(sys.stdout.line_buffering, sys.stderr.line_buffering, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "methods" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == "True True"


def test_a_closed_pipe_ends_the_cli_quietly():
    r = subprocess.run(f"{sys.executable} -m mmalign.cli list | head -1", shell=True, capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.startswith("methods") and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr
