"""Image evaluators on open_clip: CLIPScore / PickScore / HPSv2 / aesthetic on tiny models built from configs,
checked weight loading, held-out retrieval, and the shipped ShapeWorld CLIP."""
import hashlib
import json
import math
import re

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmalign.core.config import ConfigError
from mmalign.evals.clip_backbone import (ClipBackbone, WeightsError, build_clip, load_backbone, read_state_dict,
                                         save_backbone)
from mmalign.evals.clip_scorers import (SHIPPED_CLIP, Aesthetic, AestheticHead, CLIPScore, HPSv2, PickScore,
                                        load_aesthetic, load_hpsv2, load_shipped_clipscore, make_scorer,
                                        pairwise_preference, preference_probs, score_images)
from mmalign.evals.errors import EvalError
from mmalign.evals.retrieval import heldout_sets, shapeworld_retrieval, top1_hits

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CFG = {"embed_dim": 16,
            "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
            "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
PROMPTS = ["a red circle", "two blue squares", "a green triangle above a red circle", "a red circle"]


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_model(seed=0, cfg=TINY_CFG):
    torch.manual_seed(seed)
    return build_clip(cfg)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_backbone(tiny_model(), TINY_CFG, tmp_path_factory.mktemp("clip") / "tiny")


def images(n=4, size=24):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


class Controlled(torch.nn.Module):
    """Embeddings chosen by hand: an image's is its top-left pixel, a prompt's is looked up in a table."""

    def __init__(self, logit_scale):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(logit_scale)))
        self.text_projection = torch.zeros(3, 3)

    def encode_image(self, x, normalize=False):
        return F.normalize(x, dim=-1) if normalize else x

    encode_text = encode_image


TABLE = {"up": [1.0, 1.0, 0.0], "opposite": [0.0, 0.0, -1.0], "same": [3.0, 0.0, 0.0]}


def controlled_backbone(scale=50.0):
    return ClipBackbone(Controlled(scale), lambda texts: torch.tensor([TABLE[t] for t in texts]),
                        lambda im: torch.tensor(im.getpixel((0, 0)), dtype=torch.float32))


def test_clipscore_and_pickscore_hand_computed():
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    ims, prompts = [red, red, blue, red], ["up", "same", "opposite", "opposite"]
    # cos: (1,0,0)·(1,1,0)/√2 = 0.70711; (1,0,0)·(1,0,0) = 1; (0,0,1)·(0,0,-1) = -1 -> 0; (1,0,0)·(0,0,-1) = 0
    assert CLIPScore(controlled_backbone()).score(ims, prompts) == pytest.approx([70.7107, 100.0, 0.0, 0.0], abs=1e-3)
    assert PickScore(controlled_backbone(50.0)).score(ims, prompts) == pytest.approx([35.3553, 50.0, -50.0, 0.0],
                                                                                    abs=1e-3)
    assert HPSv2(controlled_backbone()).score(ims, prompts) == pytest.approx([0.70711, 1.0, -1.0, 0.0], abs=1e-5)


def test_pickscore_softmax_over_a_prompts_images():
    purple = Image.new("RGB", (4, 4), (255, 0, 255))  # cos with "up" = 1/2
    ims = [Image.new("RGB", (4, 4), (255, 0, 0)), purple, Image.new("RGB", (4, 4), (0, 0, 255))]
    probs = PickScore(controlled_backbone(2.0)).prompt_preferences(ims, "up")
    # scores 2·(0.70711, 0.5, 0): softmax = e^s / Σ e^s
    e = [math.exp(2 * 0.5 ** 0.5), math.exp(1.0), 1.0]
    assert probs == pytest.approx([v / sum(e) for v in e], abs=1e-6) and sum(probs) == pytest.approx(1.0)
    assert pairwise_preference(1.0, 0.0) == pytest.approx(math.e / (math.e + 1))
    assert pairwise_preference(0.3, 1.7) == pytest.approx(preference_probs([0.3, 1.7])[0].item())


def test_clipscore_parity_with_plain_open_clip(tiny_dir):
    """Our loader + scorer against open_clip's own local-dir loading, tokenizer and transform."""
    ref = open_clip.create_model("local-dir:" + str(tiny_dir)).eval()
    tok = open_clip.get_tokenizer("local-dir:" + str(tiny_dir))
    pre = open_clip.image_transform(16, is_train=False)
    ims = images()
    with torch.no_grad():
        i = F.normalize(ref.encode_image(torch.stack([pre(im) for im in ims])), dim=-1)
        t = F.normalize(ref.encode_text(tok(PROMPTS)), dim=-1)
    cos = (i * t).sum(-1)
    assert score_images(make_scorer("hpsv2", tiny_dir), ims, PROMPTS) == pytest.approx(cos.tolist(), abs=1e-6)
    got = score_images(make_scorer("clipscore", tiny_dir), ims, PROMPTS)
    assert got == pytest.approx((100 * cos.clamp(min=0)).tolist(), abs=1e-4)


def test_batched_equals_one_by_one_and_deterministic(tiny_dir):
    scorer = make_scorer("pickscore", tiny_dir)
    ims = images(5)
    prompts = PROMPTS + ["one cyan square"]
    batched = scorer.score(ims, prompts, batch_size=2)
    single = [scorer.score([im], [p])[0] for im, p in zip(ims, prompts)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert make_scorer("pickscore", tiny_dir).score(ims, prompts, batch_size=2) == batched  # a fresh load: identical


def test_config_json_plus_state_dict_and_hps_wrapper(tiny_dir, tmp_path):
    """A bare model-config JSON + a torch state dict wrapped as {"state_dict": ...} (the HPS file layout) load
    the same weights as the model directory; the sha256 recorded is the file's."""
    (tmp_path / "cfg.json").write_text(json.dumps(TINY_CFG))
    torch.save({"state_dict": tiny_model().state_dict()}, tmp_path / "hps.pt")
    hps = load_hpsv2(tmp_path / "hps.pt", arch=tmp_path / "cfg.json")
    ims = images(3)
    cos = hps.score(ims, PROMPTS[:3])
    clip = make_scorer("clipscore", tiny_dir).score(ims, PROMPTS[:3])
    assert [100 * max(c, 0) for c in cos] == pytest.approx(clip, abs=1e-3)  # fp16 storage in the dir: 1e-3
    assert hps.provenance["backbone"]["weights_sha256"] == sha(tmp_path / "hps.pt")


def test_fp16_storage_loads_as_fp32(tmp_path):
    model = tiny_model(1)
    save_backbone(model, TINY_CFG, tmp_path / "m", dtype=torch.float16)
    loaded = load_backbone(tmp_path / "m").model
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.half().float(), b), k


def test_aesthetic_head_against_manual_computation(tiny_dir, tmp_path):
    torch.manual_seed(3)
    head = AestheticHead(16)
    assert sorted(head.state_dict()) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    torch.save(head.state_dict(), tmp_path / "head.pth")
    scorer = load_aesthetic(tmp_path / "head.pth", tiny_dir)
    ims = images(3)
    x = scorer.backbone.image_embeddings(ims)
    assert torch.allclose(x.norm(dim=-1), torch.ones(3), atol=1e-6)
    sd = read_state_dict(tmp_path / "head.pth")
    for i in (0, 2, 4, 6, 7):  # Linear layers only; the dropouts are identity at inference
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    assert scorer.score(ims) == pytest.approx(x.squeeze(-1).tolist(), abs=1e-6)
    assert scorer.provenance["head"]["weights_sha256"] == sha(tmp_path / "head.pth")


def test_missing_weights_name_the_path(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_backbone(tmp_path / "nope.safetensors", arch="ViT-B-32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_backbone(tmp_path / "empty")
    (tmp_path / "empty" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_backbone(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="head_missing.pth"):
        make_scorer("aesthetic", tiny_dir, head=tmp_path / "head_missing.pth")
    with pytest.raises(ConfigError, match="LAION aesthetic predictor head: pass --head"):
        make_scorer("aesthetic", tiny_dir)
    with pytest.raises(ConfigError, match="needs an architecture"):
        load_backbone(tmp_path / "nope.safetensors")
    # a transformers CLIP folder (PickScore_v1's hub layout) is named as such
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no open_clip_config.json.*transformers checkpoint"):
        load_backbone(tmp_path / "hf")
    # a file that is neither safetensors nor a torch state dict is a WeightsError (an EvalError), not a traceback
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    (tmp_path / "cfg.json").write_text(json.dumps(TINY_CFG))
    with pytest.raises(EvalError, match="junk.pt: not a readable open_clip .* weights file"):
        load_backbone(tmp_path / "junk.pt", arch=tmp_path / "cfg.json")


def test_scorers_without_their_published_weights_refuse():
    for kind, named in (("pickscore", "yuvalkirstain/PickScore_v1"), ("hpsv2", "HPS_v2.1_compressed.pt"),
                        ("aesthetic", "ViT-L/14")):
        with pytest.raises(ConfigError, match=f"^{kind} needs .*{re.escape(named)}") as e:
            make_scorer(kind, head="head.pth")
        assert "pass --model" in str(e.value)
    with pytest.raises(ConfigError, match="unknown scorer 'clip'"):
        make_scorer("clip")


def test_mismatched_weights_are_refused_naming_the_tensor(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(TINY_CFG))
    wider = json.loads(json.dumps(TINY_CFG))
    wider["embed_dim"] = 24
    torch.save(tiny_model(0, wider).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(WeightsError, match=r"'text_projection' has shape \(16, 24\).*expects \(16, 16\)"):
        load_backbone(tmp_path / "wide.pt", arch=tmp_path / "cfg.json")
    sd = tiny_model().state_dict()
    del sd["visual.proj"]
    torch.save(sd, tmp_path / "short.pt")
    with pytest.raises(WeightsError, match="visual.proj"):
        load_backbone(tmp_path / "short.pt", arch=tmp_path / "cfg.json")
    torch.save(tiny_model().state_dict(), tmp_path / "ok.pt")
    torch.save(AestheticHead(32).state_dict(), tmp_path / "head32.pth")  # the backbone's embed_dim is 16
    with pytest.raises(WeightsError, match=r"'layers.0.weight' has shape \(1024, 32\)"):
        Aesthetic.load(load_backbone(tmp_path / "ok.pt", arch=tmp_path / "cfg.json"), tmp_path / "head32.pth")


def test_top1_hits_hand_computed():
    e = torch.eye(3)
    i2t, t2i = top1_hits(e, e)
    assert i2t.tolist() == [True, True, True] and t2i.tolist() == [True, True, True]
    # sim = images: image 0 prefers text 1 (miss); text 0 ties at 0 with every image and text 1 ties at 1 with
    # images 0 and 1 (ties are misses); image/text 2 hit
    i2t, t2i = top1_hits(torch.tensor([[0.0, 1, 0], [0, 1, 0], [0, 0, 1]]), e)
    assert i2t.tolist() == [False, True, True] and t2i.tolist() == [False, False, True]
    assert top1_hits(torch.ones(4, 2), torch.ones(4, 2))[0].sum() == 0  # a constant model never hits


def test_heldout_sets_have_distinct_heldout_captions():
    from mmalign.datasets.shapeworld import is_heldout
    sets = heldout_sets(2, 16)
    assert [len(s) for s in sets] == [16, 16]
    for s in sets:
        assert len({x.caption for x in s}) == 16 and all(is_heldout(x.caption) for x in s)


@pytest.mark.skipif(not (SHIPPED_CLIP / "open_clip_model.safetensors").is_file(), reason="shipped CLIP not built")
def test_shipped_clip_loads_offline_and_beats_chance():
    scorer = load_shipped_clipscore()
    assert scorer.provenance["backbone"]["weights_sha256"] == json.loads(
        (SHIPPED_CLIP / "summary.json").read_text())["weights_sha256"]
    r = shapeworld_retrieval(scorer.backbone, n_sets=2, set_size=64)
    assert r["chance"] == 1 / 64
    assert r["image_to_text"]["top1"] > 0.6 and r["text_to_image"]["top1"] > 0.6  # chance 0.016; 0.92 at build
