"""Caption normalisation and length filters (pure functions, no I/O)."""

from __future__ import annotations

import dataclasses
import html
import re
import unicodedata

_TAG = re.compile(r"<[^>]{0,200}>")
_SPACE = re.compile(r"\s+")


@dataclasses.dataclass(kw_only=True)
class CaptionConfig:
    """Caption filters. A caption outside [min, max] words or characters is dropped."""

    min_words: int = 2  # fewer words: caption_too_short
    max_words: int = 77  # more words: caption_too_long (CLIP's context is 77 tokens)
    min_chars: int = 5
    max_chars: int = 1000

    def validate(self) -> None:
        if not 0 <= self.min_words <= self.max_words:
            raise ValueError("need 0 <= min_words <= max_words")
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError("need 0 <= min_chars <= max_chars")


def to_text(raw: str | bytes | None) -> str:
    """Raw caption → str; invalid UTF-8 bytes are replaced rather than failing the row."""
    if raw is None:
        return ""
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    return str(raw)


def clean_caption(raw: str | bytes | None) -> str:
    """Normalise a web caption: entities, tags, control characters, whitespace.

    >>> clean_caption("  a <b>red</b>&amp;blue\\x00 square\\n ")
    'a red&blue square'
    """
    text = to_text(raw)
    # Entities twice: crawls often double-escape ("&amp;amp;").
    text = html.unescape(html.unescape(text))
    text = _TAG.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    # Drop control/format/surrogate characters and the U+FFFD left by invalid UTF-8.
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or (unicodedata.category(ch)[0] != "C" and ch != "\ufffd")
    )
    return _SPACE.sub(" ", text).strip()


def caption_status(caption: str, cfg: CaptionConfig) -> tuple[str, str] | None:
    """``None`` when the cleaned caption passes, else ``(status, error_message)``."""
    words, chars = len(caption.split()), len(caption)
    if words < cfg.min_words or chars < cfg.min_chars:
        return "caption_too_short", f"{words} words, {chars} chars"
    if words > cfg.max_words or chars > cfg.max_chars:
        return "caption_too_long", f"{words} words, {chars} chars"
    return None
