"""open_clip backbones for the image evaluators: architecture from data, weights from a file, checked.

A backbone is resolved from one of
- an open_clip model directory: ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``, the
  layout open_clip reads with ``local-dir:`` and from the hub) plus a weights file in it;
- ``hf-hub:org/repo`` (downloaded to the cache, then read as a directory; needs the network);
- a weights file (state dict: safetensors, or a torch pickle read with ``weights_only=True``) plus ``arch``:
  an open_clip architecture name (``ViT-H-14``) or a model-config JSON (the bare ``model_cfg`` or the
  directory file's layout);
- an open_clip pretrained tag plus ``arch`` (open_clip downloads it, where the network allows; the file then
  takes the same path as a local one).

Weights load only when every tensor name and shape matches the architecture (an error names the first
tensor that does not); nothing is resized or dropped silently. The sha256 of each weights file is recorded
for provenance. Evaluation is fp32 on CPU by default, in eval mode (no dropout), batched.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.config import ConfigError
from .errors import EvalError

CONFIG_FILE = "open_clip_config.json"
# Weight file names looked for in a model directory, in order of preference (open_clip's names first).
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                "pytorch_model.bin")


class WeightsError(EvalError, ValueError):
    """A weights file that does not fit the architecture it is loaded into."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path, what: str = "model") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch pickle (``weights_only=True``); a ``{"state_dict": ...}``
    wrapper and DataParallel's ``module.`` prefix are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights file not found: {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: not a readable {what} weights file (safetensors, or a torch state dict "
                           f"loadable with weights_only=True): {first}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: not a state dict (a mapping of tensor names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_checked(module: nn.Module, path: str | Path, what: str = "model") -> str:
    """Load a state-dict file into `module` after checking names and shapes; returns the file's sha256."""
    sd = read_state_dict(path, what)
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise WeightsError(f"{path}: {what} weights do not fit the architecture: "
                           f"{len(missing)} tensor(s) missing (first: {missing[:3]}), "
                           f"{len(unexpected)} unexpected (first: {unexpected[:3]})")
    for k, t in expected.items():
        if sd[k].shape != t.shape:
            raise WeightsError(f"{path}: tensor {k!r} has shape {tuple(sd[k].shape)} but the {what} "
                               f"architecture expects {tuple(t.shape)}")
    module.load_state_dict(sd, strict=True)  # copies (and casts, e.g. fp16 -> fp32) into the fp32 params
    return sha256_file(path)


def build_clip(model_cfg: dict) -> nn.Module:
    """An open_clip CLIP (or CustomTextCLIP for Hugging Face text towers) from a model config, random init."""
    cfg = json.loads(json.dumps(model_cfg))  # deep copy; the caller's dict stays as it was
    if "multimodal_cfg" in cfg:
        raise ConfigError("CoCa-style configs (multimodal_cfg) are not supported as evaluator backbones")
    hf_text = "hf_model_name" in cfg.get("text_cfg", {})
    if hf_text:
        cfg["text_cfg"]["hf_model_pretrained"] = False  # the weights file provides the text tower
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) or hf_text else open_clip.CLIP
    return cls(**cfg)


def read_config_json(path: str | Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from a model-config JSON: the bare model config or the directory layout."""
    doc = json.loads(Path(path).read_text())
    if "model_cfg" in doc:
        return doc["model_cfg"], doc.get("preprocess_cfg", {})
    if "vision_cfg" in doc and "text_cfg" in doc:
        return doc, {}
    raise ConfigError(f"{path}: not an open_clip model config (needs model_cfg, or vision_cfg and text_cfg)")


def _weights_in_dir(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def resolve(model: str | Path, arch: str | Path | None = None) -> tuple[dict, dict, Path, str]:
    """(model_cfg, preprocess_cfg, weights file, architecture label) for the sources listed in the module doc."""
    spec = str(model)
    if spec.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download  # network; never on a test path
        repo = spec[len("hf-hub:"):]
        if not (Path(snapshot_download(repo, allow_patterns=[CONFIG_FILE])) / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{spec}: not an open_clip model repository (no {CONFIG_FILE}); a "
                                    f"transformers CLIP checkpoint has to be converted to open_clip's layout")
        model = snapshot_download(repo, allow_patterns=[CONFIG_FILE, *WEIGHT_FILES])
    path = Path(model)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            other = " (its config.json is a transformers checkpoint's)" if (path / "config.json").is_file() else ""
            raise FileNotFoundError(f"{spec}: not an open_clip model directory (no {CONFIG_FILE}){other}")
        model_cfg, pre = read_config_json(path / CONFIG_FILE)
        return model_cfg, pre, _weights_in_dir(path), str(path / CONFIG_FILE)
    if arch is None:
        raise ConfigError(f"{model}: a weights file needs an architecture (an open_clip name or a config JSON); "
                          f"or pass an open_clip model directory")
    if str(arch).endswith(".json"):
        if not Path(arch).is_file():
            raise FileNotFoundError(f"model config file not found: {arch}")
        model_cfg, pre = read_config_json(arch)
    else:
        model_cfg, pre = open_clip.get_model_config(str(arch)), {}
        if model_cfg is None:
            raise ConfigError(f"unknown open_clip architecture {arch!r} (see open_clip.list_models())")
        if not path.exists() and spec in open_clip.list_pretrained_tags_by_model(str(arch)):
            tag_cfg = open_clip.get_pretrained_cfg(str(arch), spec)  # a published tag: download, then as a file
            path = Path(open_clip.download_pretrained(tag_cfg))
            pre = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
            model_cfg = {**model_cfg, "quick_gelu": tag_cfg.get("quick_gelu", model_cfg.get("quick_gelu", False))}
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return model_cfg, pre, path, str(arch)


def make_tokenizer(model_cfg: dict, folder: Path | None = None):
    """open_clip's CLIP BPE tokenizer (its vocabulary ships with open_clip, no hub), or the config's Hugging
    Face tokenizer (read from the model directory when there is one)."""
    text = model_cfg.get("text_cfg", {})
    ctx = text.get("context_length", 77)
    if text.get("hf_tokenizer_name"):
        from open_clip.tokenizer import HFTokenizer
        return HFTokenizer(str(folder) if folder else text["hf_tokenizer_name"], context_length=ctx)
    return open_clip.SimpleTokenizer(context_length=ctx)


def make_preprocess(preprocess_cfg: dict, image_size):
    """open_clip's evaluation transform (resize, centre crop, RGB, tensor, normalise) for PIL images."""
    return open_clip.image_transform(
        image_size, is_train=False, mean=preprocess_cfg.get("mean"), std=preprocess_cfg.get("std"),
        resize_mode=preprocess_cfg.get("resize_mode"), interpolation=preprocess_cfg.get("interpolation"))


@dataclass
class ClipBackbone:
    """An open_clip model in eval mode with its tokenizer, image transform and provenance."""

    model: nn.Module
    tokenizer: object
    preprocess: object
    provenance: dict = field(default_factory=dict)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @torch.no_grad()
    def image_embeddings(self, images, batch_size: int = 64) -> torch.Tensor:
        """(N, D) L2-normalised image embeddings of PIL images, `batch_size` at a time."""
        out = []
        with tqdm(total=len(images), desc="CLIP image embeddings", unit="img", delay=2) as bar:  # shown after 2 s
            for i in range(0, len(images), batch_size):
                x = torch.stack([self.preprocess(im) for im in images[i:i + batch_size]])
                out.append(self.model.encode_image(x, normalize=True))
                bar.update(len(x))
        return torch.cat(out) if out else torch.empty(0, self.model.text_projection.shape[-1])

    @torch.no_grad()
    def text_embeddings(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings."""
        out = [self.model.encode_text(self.tokenizer(list(texts[i:i + batch_size])), normalize=True)
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out)


def load_backbone(model: str | Path, arch: str | Path | None = None) -> ClipBackbone:
    """Resolve, build, load the checked weights; fp32, eval mode, on CPU."""
    model_cfg, pre, weights, label = resolve(model, arch)
    net = build_clip(model_cfg).float()
    sha = load_checked(net, weights, what=f"open_clip {label}")
    net.eval()
    folder = weights.parent if label.endswith(CONFIG_FILE) else None  # a model directory (local or downloaded)
    return ClipBackbone(net, make_tokenizer(model_cfg, folder), make_preprocess(pre, net.visual.image_size),
                        {"arch": label, "weights": str(weights), "weights_sha256": sha})


def save_backbone(model: nn.Module, model_cfg: dict, out: str | Path, preprocess_cfg: dict | None = None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write an open_clip model directory (config JSON + safetensors) that `load_backbone` and open_clip's
    ``create_model("local-dir:...")`` both read; `dtype` is the storage type (loading casts to fp32)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (out / CONFIG_FILE).write_text(json.dumps(doc, indent=1))
    save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()},
              str(out / WEIGHT_FILES[0]))
    return out
