"""The real CLIP BPE tokenizer, rebuilt offline from the merges file that open_clip ships.

The vocabulary is derived exactly as OpenAI's CLIP derives it: 256 byte symbols, the same with the end-of-word
marker, the first 48,894 merges, then <|startoftext|> and <|endoftext|> (49,408 tokens in all). Padding uses
<|endoftext|>, as Stable Diffusion 1.5's tokenizer does. The context is 20 tokens, not SD's 77: the world's prompts
are at most 15 with <|startoftext|> and <|endoftext|>, and padding to 77 made the base model's training step 40%
slower (0.50 s against 0.35 s at 16 tokens, batch 128) and its sampling 18% slower (measured).
"""
from __future__ import annotations

import gzip
import importlib.resources
import json
import os
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode
from transformers import CLIPTokenizer

from lpo.io import atomic_path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 20
SD_MAX_LENGTH = 77  # Stable Diffusion's text context, for tokenizers of SD-topology models
_N_MERGES = 49152 - 256 - 2


def _bpe_merges() -> list[tuple[str, str]]:
    path = importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    # The first line is a version header.
    return [tuple(line.split()) for line in lines[1:_N_MERGES + 1]]


def _vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def build_clip_tokenizer(out_dir: str | os.PathLike, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """Save the tokenizer to `out_dir` in Stable Diffusion's layout and load it back from there; `max_length` is
    the context its pipelines pad to (Stable Diffusion's own: 77)."""
    merges = _bpe_merges()
    vocab = _vocab(merges)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS, unk_token=EOS,
                              pad_token=EOS, model_max_length=max_length)
    with atomic_path(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        # vocab.json + merges.txt as in the hub's SD1.5 tokenizer folder, which tokenizers without
        # tokenizer.json support (transformers 4's slow CLIPTokenizer) read.
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer.from_pretrained(out_dir, local_files_only=True)
