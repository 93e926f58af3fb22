"""Traced tokens as readable text pieces, for the explorer and the expert cards.

A trace's ``tokens.token`` column holds the tokenizer's vocabulary strings, which are not text:
byte-level BPE vocabularies write a space as ``Ġ`` and a newline as ``Ċ`` (and a character of
several bytes over several tokens), SentencePiece ones write a space as ``▁`` and unknown bytes as
``<0x0A>``. :func:`token_pieces` turns a run of tokens into pieces whose concatenation is the text:

* with a tokenizer, piece i is what token i adds to ``tokenizer.decode`` of the run (see
  :class:`PieceDecoder`), so the tokenizer's own rules apply;
* without one, the vocabulary strings are mapped back to bytes (byte-level BPE, or SentencePiece
  when a token of the run has ``▁`` or a ``<0xHH>`` byte token) and decoded as UTF-8.

Either way a character split over several tokens lands on its last token (the earlier ones get
``""``), special tokens (BOS, chat-template markers) keep their vocabulary string, and a token the
trace has no string for (traced without a tokenizer) shows as ``⟨id⟩``. Pieces are plain text:
HTML escaping is the renderer's job, done once.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Collection, Sequence
from typing import Any

_SENTENCEPIECE_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins: {character: byte}.

    Printable bytes stand for themselves; the other 68 (controls, space, 127-160, 173) are given
    the characters 256, 257, ... in byte order (so space, byte 32, is ``Ġ`` = 256 + 32).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet = {chr(byte): byte for byte in printable}
    others = [byte for byte in range(256) if byte not in set(printable)]
    alphabet.update({chr(256 + index): byte for index, byte in enumerate(others)})
    return alphabet


_BYTE_LEVEL = _byte_level_alphabet()


class PieceDecoder:
    """Turns token ids, added one at a time, into text pieces whose concatenation is
    ``tokenizer.decode(ids, skip_special_tokens=True)``: piece i is what token i adds to the decoded
    text, so byte-level markers (``Ġ``, ``Ċ``) never show and a character split over several tokens
    lands on its last token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.text = ""
        self.pieces: list[str] = []

    def add(self, token_id: int) -> str:
        """Append a token; returns its piece."""
        self.token_ids.append(int(token_id))
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if not text.startswith(self.text):  # a tokenizer that rewrites earlier text (clean-up of spaces)
            text = self.text + self.tokenizer.decode(self.token_ids[-1:], skip_special_tokens=True)
        piece, self.text = text[len(self.text) :], text
        self.pieces.append(piece)
        return piece


def decoded_pieces(tokenizer: Any, token_ids: Sequence[int]) -> tuple[str, ...]:
    """``token_ids`` as text pieces (see :class:`PieceDecoder`)."""
    decoder = PieceDecoder(tokenizer)
    for token_id in token_ids:
        decoder.add(token_id)
    return tuple(decoder.pieces)


def token_pieces(
    token_ids: Sequence[int],
    tokens: Sequence[str | None],
    *,
    tokenizer: Any = None,
    special_ids: Collection[int] = (),
) -> list[str]:
    """The text each token adds, for one run of consecutive tokens (see the module docstring).

    Args:
        token_ids: the run's token ids, in position order.
        tokens: the vocabulary strings of the same tokens (``tokens.token``; ``None`` where unknown).
        tokenizer: decode with it when given (its ``all_special_ids`` then say which are special).
        special_ids: without a tokenizer, the special ids (``trace.special_token_ids``).
    """
    if len(token_ids) != len(tokens):
        raise ValueError(f"{len(token_ids)} token ids but {len(tokens)} token strings: give one string (or None) per id")
    if tokenizer is not None:
        special = set(tokenizer.all_special_ids)
        names = tokenizer.convert_ids_to_tokens([int(i) for i in token_ids])
        pieces = decoded_pieces(tokenizer, [int(i) for i in token_ids])
        return [names[i] if int(token_id) in special else piece for i, (token_id, piece) in enumerate(zip(token_ids, pieces))]
    # a null token string can arrive as NaN (pandas/DuckDB): anything not a string is unknown
    return _mapped_pieces([int(i) for i in token_ids], [t if isinstance(t, str) else None for t in tokens], set(special_ids))


def _mapped_pieces(token_ids: list[int], tokens: list[str | None], special: set[int]) -> list[str]:
    """Pieces from vocabulary strings alone: bytes through an incremental UTF-8 decoder."""
    sentencepiece = any(t is not None and (_SENTENCEPIECE_SPACE in t or _BYTE_TOKEN.fullmatch(t)) for t in tokens)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[str] = []
    for token_id, token in zip(token_ids, tokens):
        if token is None or token_id in special:
            pieces.append(decoder.decode(b"", final=True) + (f"⟨{token_id}⟩" if token is None else token))
            decoder.reset()
            continue
        pieces.append(decoder.decode(_sentencepiece_bytes(token) if sentencepiece else _byte_level_bytes(token)))
    if pieces:
        pieces[-1] += decoder.decode(b"", final=True)
    return pieces


def _byte_level_bytes(token: str) -> bytes:
    """A byte-level BPE vocabulary string as bytes; a string outside the alphabet (an added token) as its UTF-8."""
    if all(character in _BYTE_LEVEL for character in token):
        return bytes(_BYTE_LEVEL[character] for character in token)
    return token.encode()


def _sentencepiece_bytes(token: str) -> bytes:
    """A SentencePiece vocabulary string as bytes: ``▁`` is a space, ``<0xHH>`` the byte HH."""
    byte = _BYTE_TOKEN.fullmatch(token)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return token.replace(_SENTENCEPIECE_SPACE, " ").encode()
