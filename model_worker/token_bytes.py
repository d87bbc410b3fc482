"""The exact bytes every token id stands for, so that vocabularies of different families can meet.

Models only agree on text, and text is bytes: a union vocabulary built from token *strings* never
lets GPT-2's 'Ã©' meet Llama's ``<0xC3><0xA9>``. Rules per family (read from the backend
tokenizer's JSON, which is what actually runs, whatever the tokenizer class):

- byte-level BPE (GPT-2, Llama-3, Qwen): token strings are in GPT-2's byte-to-unicode alphabet; a
  string with a character outside it is taken as raw UTF-8, exactly as the ByteLevel decoder does.
- SentencePiece (Llama-2, Mistral, Gemma, T5): the replacement character ('▁') is a space and, with
  byte fallback, ``<0xNN>`` is that one byte.
- special tokens are not text: flagged special, with their content as bytes for display only.
- added tokens that are not special are literal text: ``content.encode()`` (a *normalized* one as the
  backend names it after normalization, read back through the normalizer's space rule).
- "other" families (WordPiece, ...) have no exact rule: the token string's UTF-8, approximate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
OTHER = "other"

_SP_SPACE = "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_NOT_A_BYTE = "\U0010ffff"  # survives the translation below and cannot be encoded as latin-1


def _gpt2_byte_alphabet() -> dict[int, int]:
    """GPT-2's bytes_to_unicode, inverted: code point of the alphabet character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + shifted
            shifted += 1
    return {char: b for b, char in chars.items()}


_BYTE_OF_CHAR = _gpt2_byte_alphabet()
# str.translate table: alphabet characters -> the latin-1 character of their byte; the code points
# below 256 that are *not* alphabet characters (space, controls, soft hyphen) -> an unencodable marker.
_BYTE_LEVEL_TRANSLATION: dict[int, int | str] = {
    **{c: _NOT_A_BYTE for c in range(256) if c not in _BYTE_OF_CHAR},
    **_BYTE_OF_CHAR,
}


def _byte_level_bytes(token: str) -> bytes:
    """Bytes of a byte-level token; raw UTF-8 if any character is outside the alphabet (as the decoder does)."""
    try:
        return token.translate(_BYTE_LEVEL_TRANSLATION).encode("latin-1")
    except UnicodeEncodeError:
        return token.encode("utf-8")


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    """The parts of the backend tokenizer's JSON these rules read: normalizer, pre-tokenizer, decoder and the
    model's byte fallback. Read part by part: the whole JSON holds the vocabulary and merges (for Gemma 3,
    262,144 tokens and 514,906 merges: a 33 MB string that parsed into ~200 MB of short-lived Python
    objects, whose freed arenas the worker kept resident)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {}
    spec: dict[str, Any] = {"model": _model_json(backend.model)}
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        component = getattr(backend, part)
        spec[part] = None if component is None else json.loads(component.__getstate__())
    return spec


def _model_json(model: Any) -> dict[str, Any]:
    """The model's JSON as far as these rules read it (its byte fallback); the whole state, vocabulary included,
    only where the binding does not expose the flag (Unigram, WordPiece, WordLevel)."""
    byte_fallback = getattr(model, "byte_fallback", None)
    if byte_fallback is None:
        return json.loads(model.__getstate__())
    return {"type": type(model).__name__, "byte_fallback": bool(byte_fallback)}


def _components(node: Any) -> list[dict[str, Any]]:
    """A normalizer / pre-tokenizer / decoder and everything nested in it (Sequence), flattened."""
    if not isinstance(node, dict):
        return []
    found = [node]
    for key in ("decoders", "pretokenizers", "normalizers"):
        for child in node.get(key) or []:
            found.extend(_components(child))
    return found


def _types(node: Any) -> set[str]:
    return {c.get("type", "") for c in _components(node)}


def _replacement(spec: dict[str, Any]) -> str:
    """The character a SentencePiece tokenizer writes for a space (almost always '▁')."""
    for part in ("decoder", "pre_tokenizer"):
        for c in _components(spec.get(part)):
            if c.get("type") == "Metaspace" and c.get("replacement"):
                return c["replacement"]
            if c.get("type") == "Replace" and c.get("content") == " ":
                pattern = (c.get("pattern") or {}).get("String")
                if pattern:
                    return pattern
    return _SP_SPACE


def _kind_from_json(spec: dict[str, Any]) -> str | None:
    decoder = _types(spec.get("decoder"))
    pre = _types(spec.get("pre_tokenizer"))
    if "ByteLevel" in decoder:
        return BYTE_LEVEL
    sp_replace = any(
        c.get("type") == "Replace" and (c.get("pattern") or {}).get("String") == _SP_SPACE
        for c in _components(spec.get("decoder"))
    )
    if decoder & {"Metaspace", "ByteFallback"} or sp_replace:
        return SENTENCEPIECE
    if "ByteLevel" in pre:
        return BYTE_LEVEL
    if "Metaspace" in pre:
        return SENTENCEPIECE
    if _normalizer_spaces_to(spec, _SP_SPACE) or any(
        c.get("type") == "Prepend" and c.get("prepend") == _SP_SPACE for c in _components(spec.get("normalizer"))
    ):
        return SENTENCEPIECE  # legacy Llama / Mistral tokenizer.json: spaces become "▁" in the normalizer
    if (spec.get("model") or {}).get("byte_fallback"):
        return SENTENCEPIECE
    return None


def _kind_from_vocab(vocab: Iterable[str]) -> str:
    """Fallback when the JSON says nothing: look at the token strings themselves."""
    vocab = list(vocab)
    if not vocab:
        return OTHER
    singles = {ord(t) for t in vocab if len(t) == 1}
    if all(c in singles for c in _BYTE_OF_CHAR) and sum(t.startswith("Ġ") for t in vocab) > 0.01 * len(vocab):
        return BYTE_LEVEL
    if sum(t.startswith(_SP_SPACE) for t in vocab) > 0.05 * len(vocab):
        return SENTENCEPIECE
    return OTHER


def tokenizer_kind(tokenizer: Any) -> str:
    """The family of the token strings, which decides their bytes: "byte_level", "sentencepiece" or "other"."""
    kind = _kind_from_json(_backend_json(tokenizer))
    if kind is not None:
        return kind
    return _kind_from_vocab(tokenizer.get_vocab())


def _special_ids(tokenizer: Any) -> set[int]:
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(int(i))
    return special


def _normalizer_spaces_to(spec: dict[str, Any], replacement: str) -> bool:
    """Whether the normalizer writes spaces as the replacement (legacy Llama tokenizer.json)."""
    return any(
        c.get("type") == "Replace" and (c.get("pattern") or {}).get("String") == " " and c.get("content") == replacement
        for c in _components(spec.get("normalizer"))
    )


def _converter(kind: str, spec: dict[str, Any], replacement: str) -> Callable[[str], bytes]:
    """Token string -> bytes for the model's own (non-added) vocabulary entries."""
    if kind == BYTE_LEVEL:
        return _byte_level_bytes
    if kind != SENTENCEPIECE:
        return lambda token: token.encode("utf-8")  # no exact rule known: the string itself
    model = spec.get("model") or {}
    byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in _types(spec.get("decoder"))

    def sentencepiece_bytes(token: str) -> bytes:
        if byte_fallback and (m := _BYTE_PIECE.fullmatch(token)):
            return bytes([int(m.group(1), 16)])
        return token.replace(replacement, " ").encode("utf-8")

    return sentencepiece_bytes


def token_byte_table(tokenizer: Any, vocab_size: int | None = None) -> tuple[list[bytes], list[bool]]:
    """Exact bytes and special flag for every id in range(vocab_size or len(tokenizer)).

    Ids the tokenizer does not define (model embedding larger than the tokenizer) get b"" and special=True.
    """
    size = len(tokenizer) if vocab_size is None else int(vocab_size)
    spec = _backend_json(tokenizer)
    kind = _kind_from_json(spec)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if kind is None:
        kind = _kind_from_vocab(_model_vocab(tokenizer))

    replacement = _replacement(spec)
    convert = _converter(kind, spec, replacement)
    normalizer_spaces = _normalizer_spaces_to(spec, replacement)
    normalizer_byte_level = "ByteLevel" in _types(spec.get("normalizer"))

    def added_text(i: int, token: Any) -> bytes:
        """A non-special added token is literal text. A normalized one is matched in the *normalized* text, and
        the backend names it by its normalized content ("foo bar" under legacy Llama's normalizer: "▁foo▁bar")."""
        if not getattr(token, "normalized", False) or backend is None:
            return token.content.encode("utf-8")
        content: str = backend.id_to_token(i) or token.content
        if normalizer_byte_level:
            return _byte_level_bytes(content)
        if normalizer_spaces:
            content = content.replace(replacement, " ")
        return content.encode("utf-8")

    # Added tokens are matched in the text before the model runs: they override the model's entry for their id.
    added = {int(i): tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special_ids = _special_ids(tokenizer)
    tokens: list[bytes] = [b""] * size
    special: list[bool] = [True] * size  # undefined ids stay b"" / special
    for i, name in enumerate(_model_names(tokenizer, size)):
        is_special = i in special_ids
        if i in added:
            # Special tokens are no text: their content is for display only.
            tokens[i] = added[i].content.encode("utf-8") if is_special else added_text(i, added[i])
        elif name is not None:
            tokens[i] = name.encode("utf-8") if is_special else convert(name)
        else:
            continue
        special[i] = is_special
    return tokens, special


def _model_vocab(tokenizer: Any) -> dict[str, int]:
    """The model's own vocabulary (added tokens left out where the backend tells them apart)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.get_vocab(with_added_tokens=False) if backend is not None else tokenizer.get_vocab()


def _model_names(tokenizer: Any, size: int) -> Iterator[str | None]:
    """The model's token string of each id in range(size), None where it has none. From the backend model id by
    id: its vocabulary as a dict would be 262,144 short-lived strings more for Gemma 3."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = backend.model
        return (model.id_to_token(i) for i in range(size))
    names: list[str | None] = [None] * size
    for name, i in _model_vocab(tokenizer).items():
        if 0 <= i < size:
            names[i] = name
    return iter(names)
