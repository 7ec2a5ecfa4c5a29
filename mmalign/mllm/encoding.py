"""Turn conversations with images into model inputs: chat template from the processor, image tokens expanded
by the processor, trainable-token masks, safe truncation, and padding into batches.

Layout of a batch row: [prompt][completion][pad] (right padding). Side inputs the processor returns pass
through untouched: per-image tensors (pixel_values, image_sizes, image_grid_thw, ...) are concatenated over
rows; per-token tensors (token_type_ids, mm_token_type_ids, ...) are padded with the ids.

Truncation only ever removes trailing completion tokens. A row whose prompt (with its image tokens) leaves no
room for one completion token is refused (`TooLong`), so an image span is never cut. Without a max_length, a row
longer than the model's own maximum (`model_max_length`) is refused whole (`BeyondModel`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import takewhile

import torch

TEXT_KEYS = ("input_ids", "attention_mask")


class TooLong(ValueError):
    """The row cannot be truncated to max_length without cutting its prompt or image tokens."""


class ImageTokenMismatch(ValueError):
    pass


class BeyondModel(ValueError):
    """The row has more tokens than the model has positions (no max_length was set to cut its answer)."""


UNKNOWN_LENGTH = 10 ** 9  # a tokenizer that does not know its model's maximum says ~1e30


@dataclass
class Encoded:
    """One tokenized sequence: ids, which tokens are trained, and the processor's side inputs."""
    ids: list[int]
    train_mask: list[int]
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # per image, dim 0 = images/patches
    token_inputs: dict[str, list[int]] = field(default_factory=dict)  # per token, aligned with ids

    @property
    def prompt_len(self) -> int:
        return self.train_mask.index(1) if 1 in self.train_mask else len(self.ids)


def render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template of the processor (or its tokenizer) applied to `messages`, as text."""
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def split_prompt(processor, prompt: list[dict], *completions: list[dict]) -> tuple[str, list[str]]:
    """(prompt text, completion texts): the prompt rendered with the generation prompt, cut back to the longest
    prefix it shares with every prompt+completion rendering (templates may render a bare prompt differently)."""
    head = render(processor, prompt, add_generation_prompt=True)
    fulls = [render(processor, prompt + c) for c in completions]
    for full in fulls:
        head = "".join(a for a, _ in takewhile(lambda ab: ab[0] == ab[1], zip(head, full)))
    return head, [full[len(head):] for full in fulls]


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def model_max_length(model_config, processor) -> int | None:
    """The most tokens the language model takes: its `max_position_embeddings`, else the tokenizer's
    `model_max_length` when that is a real number; None when neither says."""
    text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    for n in (getattr(text, "max_position_embeddings", None), getattr(model_config, "max_position_embeddings", None),
              getattr(tokenizer_of(processor), "model_max_length", None)):
        if isinstance(n, int) and 0 < n < UNKNOWN_LENGTH:
            return n
    return None


def image_token_id(processor) -> int | None:
    tok = tokenizer_of(processor)
    token = getattr(processor, "image_token", None) or getattr(tok, "image_token", None)
    return None if token is None else tok.convert_tokens_to_ids(token)


def encode_text(processor, text: str, images: list | None) -> tuple[list[int], dict, dict]:
    """(ids, per-image side inputs, per-token side inputs) of one piece of text; `images` go through the
    processor, which expands each image placeholder into the model's image tokens."""
    if images:
        out = processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
    else:
        out = tokenizer_of(processor)([text], return_tensors="pt", add_special_tokens=False)
    ids = out["input_ids"][0]
    image_inputs, token_inputs = {}, {}
    for k, v in out.items():
        if k in TEXT_KEYS or not torch.is_tensor(v):
            continue
        if v.dim() == 2 and v.shape == out["input_ids"].shape and k.endswith("token_type_ids"):
            token_inputs[k] = v[0].tolist()
        else:
            image_inputs[k] = v
    return ids.tolist(), image_inputs, token_inputs


def encode_pieces(processor, pieces: list[tuple[str, bool]], images: list) -> Encoded:
    """Concatenate tokenized pieces of text (text, trained?). Images are handed to the piece holding their
    placeholders (counted with the processor's image token string), in order."""
    placeholder = getattr(processor, "image_token", None)
    ids, mask, image_parts, token_parts = [], [], [], {}
    left = list(images)
    for text, trained in pieces:
        n = text.count(placeholder) if placeholder and images else 0
        if n > len(left):
            raise ImageTokenMismatch(f"the text has more image placeholders than images ({len(images)})")
        piece_ids, img, tok = encode_text(processor, text, left[:n] if n else None)
        left = left[n:]
        ids += piece_ids
        mask += [int(trained)] * len(piece_ids)
        image_parts.append(img)
        for k in set(tok) | set(token_parts):
            token_parts.setdefault(k, [0] * (len(ids) - len(piece_ids)))
            token_parts[k] += tok.get(k, [0] * len(piece_ids))
    if left:
        raise ImageTokenMismatch(f"{len(images)} images but only {len(images) - len(left)} image placeholders")
    image_inputs = {k: torch.cat([p[k] for p in image_parts if k in p]) for k in
                    dict.fromkeys(k for p in image_parts for k in p)}
    return Encoded(ids, mask, image_inputs, token_parts)


def expected_image_tokens(model_config) -> int | None:
    """Image tokens per image for fixed-resolution LLaVA models (None when it depends on the image)."""
    if getattr(model_config, "model_type", None) != "llava":
        return None
    vis = model_config.vision_config
    n = (vis.image_size // vis.patch_size) ** 2
    return n + (1 if model_config.vision_feature_select_strategy == "full" else 0)


def check_image_tokens(enc: Encoded, n_images: int, token_id: int | None, per_image: int | None, where: str):
    """Raise ImageTokenMismatch naming `where` unless the image tokens match the images (count per image when
    the model fixes it, else at least one token per image and none without images)."""
    if token_id is None:
        return
    found = sum(1 for i in enc.ids if i == token_id)
    want = None if per_image is None else per_image * n_images
    if (want is not None and found != want) or (want is None and (found == 0) != (n_images == 0)) \
            or (want is None and found < n_images):
        raise ImageTokenMismatch(
            f"{where}: {found} image tokens for {n_images} image(s)"
            + (f"; the model expects {per_image} per image" if per_image is not None else "")
            + " — check the image placeholders in the prompt and the processor's settings")


def truncate(enc: Encoded, max_length: int | None, image_token: int | None = None) -> Encoded:
    """Cut trailing tokens down to `max_length`. TooLong when the cut would fall inside or before an image
    span, or would leave no trained token."""
    if max_length is None or len(enc.ids) <= max_length:
        return enc
    last_image = max((i for i, t in enumerate(enc.ids) if t == image_token), default=-1)
    if last_image >= max_length:
        raise TooLong(f"image tokens run to position {last_image + 1} but max_length is {max_length}; "
                      f"cutting would split an image span")
    if 1 not in enc.train_mask[:max_length]:
        raise TooLong(f"the prompt is {enc.prompt_len} tokens (image tokens included); max_length {max_length} "
                      f"leaves no room for the answer")
    return Encoded(enc.ids[:max_length], enc.train_mask[:max_length], enc.image_inputs,
                   {k: v[:max_length] for k, v in enc.token_inputs.items()})


def cat_images(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-image tensors over rows, zero-padding trailing dims that differ (e.g. LLaVA-NeXT's
    patch count per image; the model unpads with image_sizes)."""
    out = {}
    for k in dict.fromkeys(k for p in parts for k in p):
        ts = [p[k] for p in parts if k in p]
        if len({t.shape[1:] for t in ts}) > 1:
            shape = [max(s) for s in zip(*(t.shape[1:] for t in ts))]
            padded = []
            for t in ts:
                z = t.new_zeros((t.shape[0], *shape))
                z[(slice(None), *(slice(0, s) for s in t.shape[1:]))] = t
                padded.append(z)
            ts = padded
        out[k] = torch.cat(ts)
    return out


def pad_batch(rows: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, train_mask (0/1, the loss positions) and side inputs."""
    n = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), n), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    token_keys = dict.fromkeys(k for r in rows for k in r.token_inputs)
    token = {k: torch.zeros((len(rows), n), dtype=torch.long) for k in token_keys}
    for i, r in enumerate(rows):
        ids[i, :len(r.ids)] = torch.tensor(r.ids)
        attn[i, :len(r.ids)] = 1
        mask[i, :len(r.ids)] = torch.tensor(r.train_mask)
        for k in token_keys:
            if k in r.token_inputs:
                token[k][i, :len(r.ids)] = torch.tensor(r.token_inputs[k])
    return {"input_ids": ids, "attention_mask": attn, "train_mask": mask, **token,
            **cat_images([r.image_inputs for r in rows])}


def pad_id_of(processor) -> int:
    tok = tokenizer_of(processor)
    pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return pid
