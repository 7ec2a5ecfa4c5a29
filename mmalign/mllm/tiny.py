"""Build a tiny LLaVA-format model and processor from an architecture file (configs/models/*.yaml).

Used by the ShapeWorld base script and by tests. Everything is a real transformers object
(`LlavaForConditionalGeneration`, `LlavaProcessor` = `CLIPImageProcessor` + a word-level
`PreTrainedTokenizerFast` with a chat template), saved with `save_pretrained` and loaded back through
`AutoModelForImageTextToText` / `AutoProcessor` like any user's checkpoint.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import torch
import yaml
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from ..datasets.shapeworld import sample_scenes, vocabulary
from ..datasets.shapeworld.vqa import make_vqa

PAD, UNK, IMAGE, END = "<pad>", "<unk>", "<image>", "<|end|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES)
# Content may be a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "<|{{ m['role'] }}|>"
    "{%- if m['content'] is string %} {{ m['content'] }}"
    "{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' %} <image>{%- elif c['type'] == 'text' %} {{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif %} <|end|>\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif -%}")
GENERIC_WORDS = ("the", "is", "this", "what", "an", "image", "describe", "it", "in", "there", "are", "how",
                 "many", "colour", "color", "shape", "object", "objects", "yes", "no", "none", "shapes",
                 "picture", "cat", "dog", "i", "see", "not", "sure", "attributes", "quality", "helpfulness",
                 "correctness", "coherence", "complexity", "verbosity")


def load_architecture(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"architecture file not found: {path}")
    return yaml.safe_load(path.read_text())


def chat_vocabulary(n_scenes: int = 400) -> list[str]:
    """ShapeWorld caption and VQA words, digits, punctuation and a few generic chat words."""
    words = set(vocabulary()) | set(GENERIC_WORDS) | {str(i) for i in range(10)} | set(".,?!:;'\"-")
    rng = random.Random(0)
    for scene in sample_scenes(0, n_scenes):
        for item in make_vqa(scene, rng):
            words.update(re.findall(r"\w+|[^\w\s]", f"{item.question} {item.answer}".lower()))
    return sorted(words)


def chat_tokenizer(words: list[str], model_max_length: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (lower-cased, punctuation split off, unknown words -> <unk>) whose special tokens
    are the chat roles, <|end|> (end of turn = EOS), <image> and <pad>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    specials = [PAD, UNK, END, IMAGE, *ROLE_TOKENS]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ?"
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=END, pad_token=PAD, unk_token=UNK,
                                   model_max_length=model_max_length, chat_template=CHAT_TEMPLATE,
                                   extra_special_tokens={"image_token": IMAGE})


def build_tiny_llava(arch: dict, seed: int = 0, words: list[str] | None = None
                     ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised LLaVA model and its processor (CLIP tower with a CLS token, so the processor
    needs num_additional_image_tokens=1 under the "default" feature strategy)."""
    torch.manual_seed(seed)
    size, vis, txt = arch["image_size"], arch["vision"], arch["text"]
    tok = chat_tokenizer(words or chat_vocabulary(), model_max_length=txt["max_position_embeddings"])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=vis["patch_size"],
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=size, **vis),
        text_config=LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                bos_token_id=None, **txt),
        image_token_index=tok.convert_tokens_to_ids(IMAGE), image_seq_length=(size // vis["patch_size"]) ** 2,
        vision_feature_select_strategy="default", vision_feature_layer=arch.get("vision_feature_layer", -2))
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), processor
