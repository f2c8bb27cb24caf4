"""Tokenizers built from GGUF metadata: GPT-2 style byte-level BPE (SmolLM2).

The vocabulary and merges come from `tokenizer.ggml.tokens` / `tokenizer.ggml.merges`.
Pre-tokenization follows SmolLM2's: digits split one by one, then the GPT-2 pattern
(contractions, letters, digits, other symbols, whitespace), written with Python's `re`
(`[^\\W\\d_]` stands for \\p{L}).
"""

from __future__ import annotations

import functools
import re

_GPT2_PATTERN = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable unicode characters."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


class ByteLevelBPE:
  """encode(text) -> ids, decode(ids) -> text; round-trips any UTF-8 text."""

  def __init__(self, tokens: list[str], merges: list[str], *, bos_id: int | None = None,
               eos_id: int | None = None, split_digits: bool = True,
               special: tuple[str, ...] = ()):
    self.tokens = tokens
    # Control tokens (<|im_start|>, ...) are matched whole before any pre-tokenization.
    self.special = re.compile("(" + "|".join(map(re.escape, special)) + ")") if special else None
    self.ids = {t: i for i, t in enumerate(tokens)}
    self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
    self.byte_map = bytes_to_unicode()
    self.unbyte = {c: b for b, c in self.byte_map.items()}
    self.bos_id, self.eos_id = bos_id, eos_id
    self.split_digits = split_digits
    self._cache: dict[str, list[int]] = {}

  @classmethod
  def from_gguf(cls, f) -> "ByteLevelBPE":
    if f.field("tokenizer.ggml.model") != "gpt2":
      raise ValueError(f"not a byte-level BPE vocabulary: {f.field('tokenizer.ggml.model')!r}")
    tokens = f.field("tokenizer.ggml.tokens")
    types = f.field("tokenizer.ggml.token_type") or []
    special = tuple(t for t, kind in zip(tokens, types) if kind == 3 and len(t) > 1)  # CONTROL
    return cls(tokens, f.field("tokenizer.ggml.merges"),
               bos_id=f.field("tokenizer.ggml.bos_token_id"),
               eos_id=f.field("tokenizer.ggml.eos_token_id"), special=special)

  def _bpe(self, word: str) -> list[int]:
    if word in self._cache:
      return self._cache[word]
    parts = list(word)
    while len(parts) > 1:
      pairs = [(self.ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
      ranked = [(r, i) for r, i in pairs if r is not None]
      if not ranked:
        break
      _, i = min(ranked)
      parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    ids = [self.ids[p] for p in parts]
    self._cache[word] = ids
    return ids

  def pre_tokenize(self, text: str) -> list[str]:
    pieces = re.split(r"(\d)", text) if self.split_digits else [text]
    words = []
    for piece in pieces:
      if not piece:
        continue
      if self.split_digits and len(piece) == 1 and piece.isdigit():
        words.append(piece)
      else:
        words.extend(_GPT2_PATTERN.findall(piece))
    return words

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = [self.bos_id] if add_bos and self.bos_id is not None else []
    chunks = self.special.split(text) if self.special else [text]
    for chunk in chunks:
      if chunk in self.ids and self.special is not None and self.special.fullmatch(chunk):
        ids.append(self.ids[chunk])
        continue
      for word in self.pre_tokenize(chunk):
        ids.extend(self._bpe("".join(self.byte_map[b] for b in word.encode("utf-8"))))
    return ids

  def decode(self, ids) -> str:
    text = "".join(self.tokens[int(i)] for i in ids)
    return bytes(self.unbyte[c] for c in text if c in self.unbyte).decode("utf-8",
                                                                           errors="replace")
