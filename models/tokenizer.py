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


class SentencePieceBPE:
  """SentencePiece-style BPE from GGUF metadata (Gemma): scored pieces, "▁" for spaces,
  byte fallback (<0xXX>) for characters outside the vocabulary.

  Encoding merges, within each whitespace-led word, the adjacent pair whose union is a
  piece with the highest score, until none is left (what llama.cpp's SPM tokenizer does).
  """

  SPACE = "\u2581"

  def __init__(self, tokens: list[str], scores: list[float], token_types: list[int], *,
               bos_id: int | None = None, eos_id: int | None = None,
               add_bos: bool = True):
    self.tokens = tokens
    self.scores = scores
    self.ids = {t: i for i, t in enumerate(tokens)}
    self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
    self.byte_ids = {}
    for i, t in enumerate(tokens):
      if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
        self.byte_ids[int(t[3:5], 16)] = i
    # Control (3) and user-defined (4) tokens are matched whole.
    special = [t for t, kind in zip(tokens, token_types) if kind in (3, 4) and len(t) > 1]
    special.sort(key=len, reverse=True)
    self.special = re.compile("(" + "|".join(map(re.escape, special)) + ")") if special else None
    # Decoding drops only what is not text: BOS and padding. Other control tokens
    # (<start_of_turn>, ...) render as themselves, so text round-trips.
    self.silent = {i for i in (bos_id, self.ids.get("<pad>")) if i is not None}
    self._cache: dict[str, list[int]] = {}

  @classmethod
  def from_gguf(cls, f) -> "SentencePieceBPE":
    if f.field("tokenizer.ggml.model") != "llama":
      raise ValueError(f"not a SentencePiece vocabulary: {f.field('tokenizer.ggml.model')!r}")
    return cls(f.field("tokenizer.ggml.tokens"), f.field("tokenizer.ggml.scores"),
               f.field("tokenizer.ggml.token_type"),
               bos_id=f.field("tokenizer.ggml.bos_token_id"),
               eos_id=f.field("tokenizer.ggml.eos_token_id"),
               add_bos=bool(f.field("tokenizer.ggml.add_bos_token", True)))

  def _word(self, word: str) -> list[int]:
    if word in self._cache:
      return self._cache[word]
    parts = list(word)
    while len(parts) > 1:
      best, best_i = None, -1
      for i in range(len(parts) - 1):
        j = self.ids.get(parts[i] + parts[i + 1])
        if j is not None and (best is None or self.scores[j] > best):
          best, best_i = self.scores[j], i
      if best is None:
        break
      parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    ids = []
    for p in parts:
      if p in self.ids:
        ids.append(self.ids[p])
      else:
        ids.extend(self.byte_ids[b] for b in p.encode("utf-8"))
    self._cache[word] = ids
    return ids

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    add_bos = self.add_bos if add_bos is None else add_bos
    ids = [self.bos_id] if add_bos and self.bos_id is not None else []
    chunks = self.special.split(text) if self.special else [text]
    for chunk in chunks:
      if not chunk:
        continue
      if self.special is not None and self.special.fullmatch(chunk):
        ids.append(self.ids[chunk])
        continue
      s = chunk.replace(" ", self.SPACE)
      # Words start at a "▁" that follows a non-space: runs of spaces stay together.
      for word in re.findall(f"{self.SPACE}*[^{self.SPACE}]*", s):
        if word:
          ids.extend(self._word(word))
    return ids

  def decode(self, ids) -> str:
    out, pending = [], bytearray()
    for i in ids:
      i = int(i)
      if i in self.silent:
        continue
      if i in self.byte_ids.values():
        pending.append(int(self.tokens[i][3:5], 16))
        continue
      if pending:
        out.append(pending.decode("utf-8", errors="replace"))
        pending = bytearray()
      out.append(self.tokens[i].replace(self.SPACE, " "))
    if pending:
      out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)


def tokenizer_from_gguf(f):
  """The tokenizer a GGUF file describes: byte-level BPE (gpt2) or SentencePiece (llama)."""
  kind = f.field("tokenizer.ggml.model")
  if kind == "gpt2":
    return ByteLevelBPE.from_gguf(f)
  if kind == "llama":
    return SentencePieceBPE.from_gguf(f)
  raise ValueError(f"unsupported tokenizer model {kind!r}")
