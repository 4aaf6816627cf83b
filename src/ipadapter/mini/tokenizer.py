"""A CLIP tokenizer built offline: byte-level characters only (no merges), the CLIP special tokens.

Vocabulary: ``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1, then each of the 256 byte-level characters alone
and with ``</w>`` (word end). Without merges every word is spelled character by character, which is all a
model trained from scratch on short captions needs, and it round-trips through ``CLIPTokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer


def byte_characters() -> list[str]:
    """The 256 byte-level characters of the CLIP/GPT-2 BPE alphabet, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_tokenizer(folder: str | Path, max_length: int = 77) -> CLIPTokenizer:
    """Write ``vocab.json`` / ``merges.txt`` to ``folder`` and return the tokenizer they make."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in byte_characters():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
