"""Tiny LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL and Gemma-3 checkpoints built from configs (no hub), for tests of the MLLM code
path beyond LLaVA-1.5. Each builder returns (model, processor) with random weights; save both with
`save_pretrained` and load them back with AutoModelForImageTextToText / AutoProcessor.

Tokenizers are word-level `PreTrainedTokenizerFast`s holding each family's special tokens; chat templates emit
each family's image placeholder for an {"type": "image"} content part.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from .tiny import CHAT_TEMPLATE as LLAVA_TEMPLATE
from .tiny import GENERIC_WORDS

WORDS = sorted(set(GENERIC_WORDS) | {"a", "two", "circle", "circles", "square", "squares", "red", "blue",
                                     "green", "yellow", "user", "assistant", "system", "model"}
               | {str(i) for i in range(10)} | set(".,?!:;'\"-"))
MEAN = [0.5, 0.5, 0.5]


def _content(image: str) -> str:
    """Jinja for one message's content: a string, or parts with images rendered as `image`."""
    return ("{%- if m['content'] is string %}{{ m['content'] }}"
            "{%- else -%}{%- for c in m['content'] -%}"
            "{%- if c['type'] == 'image' %}" + image + "{%- elif c['type'] == 'text' %}{{ c['text'] }}{%- endif -%}"
            "{%- endfor -%}{%- endif %}")


QWEN_TEMPLATE = ("{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n" + _content(
    "<|vision_start|><|image_pad|><|vision_end|>") + "<|im_end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}")
GEMMA_TEMPLATE = ("{%- for m in messages -%}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n" + _content(" <start_of_image> ")
                  + "<end_of_turn>\n{% endfor -%}"
                  "{%- if add_generation_prompt %}<start_of_turn>model\n{% endif -%}")


def word_tokenizer(specials: list[str], eos: str, pad: str, unk: str, template: str,
                   extra: dict[str, str] | None = None, words=WORDS) -> PreTrainedTokenizerFast:
    """Lower-cased word-level tokenizer; `specials` first (ids 0..), then `words`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token=pad, unk_token=unk,
                                   model_max_length=512, chat_template=template, extra_special_tokens=extra or {})


def _finish(model, tok):
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval()


def build_tiny_llava_next(seed: int = 0):
    """LLaVA-NeXT: CLIP tower on 16 px tiles (8 px patches, CLS dropped), any-res grid over 16/32 px pinpoints,
    so an image's patch count (pixel_values dim 1) and token count depend on its size."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    torch.manual_seed(seed)
    tile, patch, pinpoints = 16, 8, [[16, 32], [32, 16], [32, 32]]
    tok = word_tokenizer(["<pad>", "<unk>", "<|end|>", "<image>", "<|system|>", "<|user|>", "<|assistant|>"],
                         "<|end|>", "<pad>", "<unk>", LLAVA_TEMPLATE, {"image_token": "<image>"})
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
        image_mean=MEAN, image_std=MEAN)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=tile, patch_size=patch, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=(tile // patch) ** 2)
    return _finish(LlavaNextForConditionalGeneration(config), tok), processor


def build_tiny_qwen2_vl(seed: int = 0, v2_5: bool = False):
    """Qwen2-VL (or Qwen2.5-VL: windowed vision attention, one full-attention block): 4 px patches merged 2x2,
    temporal patch 2, images resized to multiples of 8 within 8x8..32x32 px, so flattened pixel_values rows and
    image_grid_thw vary per image; M-RoPE sections [2, 3, 3] (head_dim 16)."""
    import transformers as tf
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    torch.manual_seed(seed)
    specials = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = word_tokenizer(specials, "<|im_end|>", "<|endoftext|>", "<unk>", QWEN_TEMPLATE)
    kw = dict(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8, max_pixels=32 * 32,
              image_mean=MEAN, image_std=MEAN)
    family = "Qwen2_5_VL" if v2_5 else "Qwen2VL"
    processor = getattr(tf, f"{family}Processor")(
        image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok, video_processor=Qwen2VLVideoProcessor(**kw),
        chat_template=QWEN_TEMPLATE)
    vision = dict(depth=1, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    if v2_5:  # hidden_size is the tower's width there; out_hidden_size the LM's
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    ids = tok.convert_tokens_to_ids
    config = getattr(tf, f"{family}Config")(
        vision_config=vision,
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    return _finish(getattr(tf, f"{family}ForConditionalGeneration")(config), tok), processor


def build_tiny_gemma3(seed: int = 0):
    """Gemma-3: SigLIP tower on 16 px images (4 px patches), pooled to 4 soft tokens per image between
    <start_of_image> and <end_of_image>; the processor returns token_type_ids (1 on image tokens)."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)

    torch.manual_seed(seed)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    tok = word_tokenizer(specials, "<end_of_turn>", "<pad>", "<unk>", GEMMA_TEMPLATE,
                         {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                          "eoi_token": "<end_of_image>"})
    image_processor = Gemma3ImageProcessor(size={"height": 16, "width": 16}, image_mean=MEAN, image_std=MEAN)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=GEMMA_TEMPLATE,
                                image_seq_length=4)
    ids = tok.convert_tokens_to_ids
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2),
        text_config=Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=512,
                                     sliding_window=512, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id, bos_token_id=ids("<bos>")),
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"))
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # initialised to zeros, which would cut the images off the language model
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    return _finish(model, tok), processor


BUILDERS = {"llava_next": build_tiny_llava_next, "qwen2_vl": build_tiny_qwen2_vl,
            "qwen2_5_vl": lambda seed=0: build_tiny_qwen2_vl(seed, v2_5=True), "gemma3": build_tiny_gemma3}
