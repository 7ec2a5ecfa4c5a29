"""Tokenizers that work with no model hub.

- `clip_bpe_tokenizer`: the real CLIP BPE tokenizer (the one SD1.5/SDXL use), built from the vocabulary that
  open_clip ships, saved as vocab.json + merges.txt and loaded by transformers' `CLIPTokenizer`.
- `word_level_tokenizer`: a tiny closed-vocabulary tokenizer for ShapeWorld's caption grammar.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer, PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"
CLIP_MERGES = 49152 - 256 - 2  # open_clip keeps this many merges (49,408-entry vocabulary)


def _bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def clip_bpe_tokenizer(out_dir: str | Path, model_max_length: int = 77) -> CLIPTokenizer:
    """Write CLIP's BPE vocabulary (from open_clip's packaged file) to `out_dir` and load it as a
    `CLIPTokenizer`. Token ids equal open_clip's tokenizer's."""
    import open_clip

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(open_clip.tokenizer.default_bpe(), "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:CLIP_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                    encoding="utf-8")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=model_max_length,
                        pad_token=EOS)
    tok.save_pretrained(out)
    return tok


def word_level_tokenizer(words: list[str], model_max_length: int) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with CLIP-style BOS/EOS framing; unknown words map to <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = [PAD, UNK, BOS, EOS]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=model_max_length)
