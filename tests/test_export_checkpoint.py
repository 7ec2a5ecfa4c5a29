"""`mmalign export`: a run's intermediate checkpoint exported with the method's own writer, equal to what the run
itself writes at that step; clear errors for a missing step, a mismatched recipe and an occupied folder."""
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmalign.core.config import ConfigError
from mmalign.core.export import checkpoint_path, export_checkpoint
from mmalign.core.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_core_trainer import make_exp  # noqa: E402
from ddp_worker import ToyMethod  # noqa: E402


def test_export_of_the_last_checkpoint_equals_final_and_earlier_steps_differ(tmp_path):
    exp = make_exp(tmp_path, "run", max_steps=8, save_every=4)
    train(exp, ToyMethod(exp.args.toy))
    run = Path(exp.output_dir)
    final = load_file(str(run / "final" / "model.safetensors"))
    at8 = export_checkpoint(ToyMethod(exp.args.toy), checkpoint_path(run, None), tmp_path / "e8", seed=0)
    at4 = export_checkpoint(ToyMethod(exp.args.toy), checkpoint_path(run, 4), tmp_path / "e4", seed=0)
    w8, w4 = load_file(str(at8 / "model.safetensors")), load_file(str(at4 / "model.safetensors"))
    assert w8.keys() == final.keys() and all(torch.equal(w8[k], final[k]) for k in final)
    assert any(not torch.equal(w4[k], w8[k]) for k in w8)  # step 4 is another policy
    with pytest.raises(FileNotFoundError, match="step-00000005: no such checkpoint .*step-00000004, step-00000008"):
        checkpoint_path(run, 5)
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export_checkpoint(ToyMethod(exp.args.toy), checkpoint_path(run, 4), tmp_path / "e4")
    params = load_file(str(run / "checkpoints" / "step-00000004" / "params.safetensors"))
    save_file({f"renamed.{k}": v for k, v in params.items()}, str(run / "checkpoints" / "step-00000004" /
                                                                  "params.safetensors"))
    with pytest.raises(ConfigError, match="do not match the recipe's trainable ones"):
        export_checkpoint(ToyMethod(exp.args.toy), checkpoint_path(run, 4), tmp_path / "e4b")
