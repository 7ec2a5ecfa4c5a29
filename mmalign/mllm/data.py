"""Encoded datasets for the MLLM methods: pairs ([chosen; rejected] with the prompt shared) and conversations
(SFT, every assistant turn trained). Encoding runs once, before training; rows that cannot be encoded are
counted skips with their reason (or a DataError under bad_rows: error), so the first step never meets them."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..datasets.records import DataError, SkipReport, reject
from .encoding import (BeyondModel, Encoded, ImageTokenMismatch, TooLong, check_image_tokens, encode_pieces,
                       encode_text, expected_image_tokens, image_token_id, model_max_length, pad_batch, render,
                       split_prompt, truncate)


@dataclass
class EncodedPair:
    index: int
    chosen: Encoded
    rejected: Encoded
    cropped: Encoded | None = None  # mDPO: the chosen answer under a cropped image
    margin: float = 0.0  # MM-DPO: the pair's reward margin (meta), 0 if absent


def append_completion(prompt: Encoded, ids: list[int]) -> Encoded:
    n = len(ids)
    return Encoded(prompt.ids + ids, [0] * len(prompt.ids) + [1] * n, prompt.image_inputs,
                   {k: v + [0] * n for k, v in prompt.token_inputs.items()})


def random_crop(image, rng: random.Random, min_area: float, max_area: float):
    """A crop keeping a fraction of the area drawn from [min_area, max_area] (aspect kept), resized back."""
    w, h = image.size
    keep = rng.uniform(min_area, max_area) ** 0.5
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return image.crop((x, y, x + cw, y + ch)).resize((w, h))


class Encoder:
    """Encodes records with one processor and one policy for skips: length, image-token checks.

    `max_length` None: a row longer than the model's own maximum (`model_max_length`) is skipped whole. A number
    (at most the model's maximum): longer rows lose trailing answer tokens, never prompt or image tokens."""

    def __init__(self, processor, model_config, max_length: int | None, bad_rows: str, report: SkipReport):
        self.processor, self.max_length, self.bad_rows, self.report = processor, max_length, bad_rows, report
        self.positions = model_max_length(model_config, processor)
        if max_length is not None and self.positions is not None and max_length > self.positions:
            from ..core.config import ConfigError
            raise ConfigError(f"data.max_length: {max_length} is more than the model's {self.positions} positions "
                              f"(0 = the model's maximum)")
        self.token_id = image_token_id(processor)  # what the processor expands (<start_of_image> for Gemma-3)
        # the tokens the image features fill (Gemma-3: <image_soft_token>); truncation must not cut into them
        self.span_id = getattr(model_config, "image_token_id", None) or self.token_id
        self.per_image = expected_image_tokens(model_config)

    def finish(self, enc: Encoded, n_images: int, where: str) -> Encoded:
        check_image_tokens(enc, n_images, self.token_id, self.per_image, where)
        if self.max_length is None and self.positions is not None and len(enc.ids) > self.positions:
            raise BeyondModel(f"{len(enc.ids)} tokens; set data.max_length to cut long answers to fit")
        return truncate(enc, self.max_length, self.span_id)

    def skip(self, err: Exception, where: str) -> None:
        """Count (or raise, under bad_rows: error) one row by kind; the details go with its location."""
        kind = ("too long for max_length (prompt and image tokens are never cut)" if isinstance(err, TooLong)
                else f"longer than the model's {self.positions} positions" if isinstance(err, BeyondModel)
                else "image tokens do not match the images" if isinstance(err, ImageTokenMismatch)
                else "cannot encode")
        reject(self.report, self.bad_rows, kind, f"{where} ({err})")

    def pair(self, i: int, rec, images: list, crop: tuple | None, crop_key=None) -> EncodedPair | None:
        """`crop_key` seeds the mDPO crop (default `i`; the sharded encoder passes the source row)."""
        where = getattr(rec, "where", "") or f"pair {i}"
        try:
            head, (chosen, rejected) = split_prompt(self.processor, rec.prompt, rec.chosen, rec.rejected)
            prompt = encode_pieces(self.processor, [(head, False)], images)
            ids_c = encode_text(self.processor, chosen, None)[0]
            ids_r = encode_text(self.processor, rejected, None)[0]
            if not ids_c or not ids_r:
                raise ValueError("an answer encodes to no tokens")
            out = EncodedPair(i, self.finish(append_completion(prompt, ids_c), len(images), where),
                              self.finish(append_completion(prompt, ids_r), len(images), where),
                              margin=float(rec.meta.get("margin", 0.0)))
            if crop is not None:
                rng = random.Random(f"{crop[0]}:{i if crop_key is None else crop_key}")
                small = [random_crop(im, rng, crop[1], crop[2]) for im in images]
                out.cropped = self.finish(append_completion(
                    encode_pieces(self.processor, [(head, False)], small), ids_c), len(images), where)
            return out
        except (TooLong, ImageTokenMismatch, ValueError) as e:
            if isinstance(e, DataError):
                raise
            self.skip(e, where)
            return None

    def conversation(self, i: int, messages: list[dict], images: list, where: str) -> Encoded | None:
        try:
            return self.finish(encode_pieces(self.processor, conversation_pieces(self.processor, messages),
                                             images), len(images), where)
        except (TooLong, ImageTokenMismatch, ValueError) as e:
            if isinstance(e, DataError):
                raise
            self.skip(e, where)
            return None


def conversation_pieces(processor, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: each assistant turn's own text is trained;
    everything else (system, user turns, generation prompts) is context."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn to train on")
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, (turn,) = split_prompt(processor, messages[:i], [m])
        if not head.startswith(done):
            raise ValueError("the chat template renders earlier turns differently once later turns are added; "
                             "cannot locate the assistant turns")
        pieces += [(head[len(done):], False), (turn, True)]
        done = head + turn
    full = render(processor, messages)
    if not full.startswith(done):
        raise ValueError("the chat template does not render the conversation as the concatenation of its turns")
    if full[len(done):]:
        pieces.append((full[len(done):], False))
    return [(t, trained) for t, trained in pieces if t]


def collate_pairs(rows: list[EncodedPair], pad_id: int, ref: dict[int, torch.Tensor] | None = None,
                  pack: bool = False) -> dict:
    """{"pairs": [chosen rows; rejected rows] batch — or "packed": one [prompt][chosen][rejected] row per pair
    (see packing.py) —, "margin": (B,), optional "cropped" batch and "ref_logps": (2B,) or (3B,) with cropped)
    from the reference cache}."""
    from .packing import pack_batch

    pairs = (pack_batch([(r.chosen, r.rejected) for r in rows], pad_id) if pack
             else pad_batch([r.chosen for r in rows] + [r.rejected for r in rows], pad_id))
    batch = {"packed" if pack else "pairs": pairs,
             "margin": torch.tensor([r.margin for r in rows], dtype=torch.float32)}
    if rows[0].cropped is not None:
        batch["cropped"] = pad_batch([r.cropped for r in rows], pad_id)
    if ref is not None:
        batch["ref_logps"] = torch.stack([ref[r.index] for r in rows]).T.reshape(-1)  # [c..., r..., crop...]
    return batch

