"""The shipped recipes under configs/: each loads strictly with its method's config class, the method x family
grid of preference recipes is complete, and the override lines their comments advertise load too."""
import re
from pathlib import Path

import pytest

from mmalign.core.config import load_experiment, read_method_name
from mmalign.core.registry import METHODS, PAIR_METHOD_NAMES, method_class

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
FAMILIES = ("shapeworld", "sd15", "sdxl")
SHAPEWORLD_BASE = "mmalign/assets/shapeworld_sd"
GRID = [(f, m) for f in FAMILIES for m in PAIR_METHOD_NAMES]


def recipes() -> list[Path]:
    """Top-level configs/*.yaml whose `method:` names a known method (configs/models/ holds architectures)."""
    out = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        try:
            name = read_method_name(str(path))
        except Exception:
            continue
        if name in METHODS:
            out.append(path)
    return out


def load(path: Path, overrides=()):
    name = read_method_name(str(path), overrides)
    return load_experiment(str(path), list(overrides), method_class(name).config_class)


def advertised_overrides(path: Path) -> list[list[str]]:
    """Override lists from comment lines `# mmalign train configs/<this file> key=value ...` (the `# Run:` line
    too)."""
    found = []
    for line in path.read_text().splitlines():
        m = re.match(r"#\s*(?:Run:\s*)?mmalign train (\S+)((?:\s+\S+=\S+)+)\s*$", line)
        if m:
            assert m.group(1) == f"configs/{path.name}", f"{path.name}: comment runs another recipe: {line}"
            found.append(m.group(2).split())
    return found


def run_line(path: Path) -> list[str]:
    """The overrides of the recipe's opening `# Run: mmalign train configs/<this file> [key=value ...]` line."""
    first = path.read_text().splitlines()[0]
    m = re.fullmatch(r"# Run: mmalign train (\S+)((?:\s+\S+=\S+)*)\s*", first)
    assert m, f"{path.name}: the first line is not '# Run: mmalign train configs/{path.name} ...': {first}"
    assert m.group(1) == f"configs/{path.name}"
    return m.group(2).split()


def test_grid_complete():
    missing = [f"{f}_{m}.yaml" for f, m in GRID if not (CONFIGS / f"{f}_{m}.yaml").is_file()]
    assert not missing, f"missing recipes: {missing}"
    assert len(GRID) == 18
    assert {p.name for p in recipes()} >= {f"{f}_{m}.yaml" for f, m in GRID}


@pytest.mark.parametrize("path", recipes(), ids=lambda p: p.name)
def test_recipe_loads_strictly(path):
    exp = load(path)
    assert exp.output_dir == f"runs/{path.stem}", "output_dir: runs/<file stem>"
    # constructing the method validates cross-field rules (e.g. adapters_off needs LoRA); nothing is loaded
    method_class(exp.method)(exp.args, exp.output_dir)
    assert path.read_text().startswith("#"), "a recipe opens with its comment block"


@pytest.mark.parametrize("family,method", GRID, ids=[f"{f}_{m}" for f, m in GRID])
def test_grid_recipe(family, method):
    path = CONFIGS / f"{family}_{method}.yaml"
    exp = load(path)
    assert exp.method == method
    a = exp.args
    if family == "shapeworld":
        assert a.model.pretrained == SHAPEWORLD_BASE
        assert (ROOT / SHAPEWORLD_BASE / "model_index.json").is_file()
        assert a.data.path == "runs/pairs/shapeworld"
        assert a.data.random_flip is False  # a flip contradicts "left of" captions
        assert exp.train.mixed_precision == "no"
        assert "mmalign data pairs --out runs/pairs/shapeworld" in path.read_text()
    else:
        assert a.data.path == "yuvalkirstain/pickapic_v2"
        assert a.data.resolution == {"sd15": 512, "sdxl": 1024}[family]
        assert exp.train.mixed_precision == "bf16"
        if family == "sdxl":
            assert a.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
            assert exp.train.optimizer == "adafactor"
    if method == "diffusion_cca":
        assert exp.train.batch_size >= 2, "CCA's negatives are the other rows of the micro-batch"
    if family != "shapeworld" and method != "diffusion_sft_winners":
        assert any("model.lora_rank=8" in o for o in advertised_overrides(path)), \
            "SD1.5/SDXL recipes show their LoRA overrides"


@pytest.mark.parametrize("path", recipes(), ids=lambda p: p.name)
def test_advertised_overrides_load(path):
    for overrides in advertised_overrides(path):
        exp = load(path, overrides)
        method_class(exp.method)(exp.args, exp.output_dir)
        if any(o.startswith("model.lora_rank=") for o in overrides):
            assert exp.args.model.lora_rank > 0


DEMO_RECIPE_STEMS = [f"shapeworld_{m}" for m in PAIR_METHOD_NAMES] + ["shapeworld_mllm_dpo", "shapeworld_video_dpo"]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("stem", DEMO_RECIPE_STEMS)
def test_demo_runs_are_the_recipe_plus_placement_and_scale(stem):
    """demo.load_demo_recipe changes only the keys it is given (and train.resume); a path stays a string whatever it
    looks like to YAML."""
    from mmalign.core.config import resolved_dict
    from mmalign.demo import load_demo_recipe

    plain = _flat(resolved_dict(load(CONFIGS / f"{stem}.yaml")))
    over = {"model.pretrained": "/x: y", "data.path": "123", "output_dir": "runs/[o]", "train.max_steps": 3}
    demo = _flat(resolved_dict(load_demo_recipe(stem, over)))
    assert {k for k in plain if plain[k] != demo[k]} == {*over, "train.resume"}
    assert {k: demo[k] for k in over} == over and demo["train.resume"] == "never"


@pytest.mark.parametrize("path", recipes(), ids=lambda p: p.name)
def test_recipe_opens_with_how_to_run_it(path):
    """Line 1: one command that runs it (with the overrides a local run needs, which load), then what it expects."""
    overrides = run_line(path)
    assert path.read_text().splitlines()[1].startswith("# Expects: ")
    exp = load(path, overrides)
    method_class(exp.method)(exp.args, exp.output_dir)
    if not path.stem.startswith("shapeworld_"):  # hub ids and 1024 px defaults: a local run names its own files
        assert {"model.pretrained", "data.path"} <= {o.split("=")[0] for o in overrides}
        local_batch = exp.train.batch_size * exp.train.grad_accum
        assert local_batch <= 128, f"the Run line's global batch is {local_batch}"
    assert "GPU" in path.read_text().split("\nmethod:")[0] or path.stem.startswith("shapeworld_")


@pytest.mark.parametrize("path", recipes(), ids=lambda p: p.name)
def test_no_recipe_starts_from_a_run_output(path):
    """A model key never points at another run's output (it may not exist); the comments say how to chain runs."""
    model = load(path).args.model
    for key in ("pretrained", "motion_adapter"):
        value = getattr(model, key, "") or ""
        assert not value.startswith("runs/"), f"{path.name}: model.{key}: {value}"
