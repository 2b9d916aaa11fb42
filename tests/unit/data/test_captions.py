from __future__ import annotations

import pytest

from mmcore.data.captions import CaptionConfig, caption_status, clean_caption


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  a red   circle\n\t", "a red circle"),
        ("<p>a <b>red</b> circle</p>", "a red circle"),
        ("fish &amp; chips &amp;amp; peas&nbsp;now", "fish & chips & peas now"),
        ("a\x00 red\x07 circle\u200b", "a red circle"),
        (b"caf\xc3\xa9 \xff\xfe bar", "café bar"),  # invalid UTF-8 bytes dropped
        ("cafe\u0301", "café"),  # NFC
        (None, ""),
        (" \t\n ", ""),
    ],
)
def test_clean_caption(raw: str | bytes | None, clean: str) -> None:
    assert clean_caption(raw) == clean


def test_caption_filters() -> None:
    cfg = CaptionConfig(min_words=2, max_words=5, min_chars=5, max_chars=30)
    assert caption_status("a red circle", cfg) is None
    assert caption_status("", cfg)[0] == "caption_too_short"
    assert caption_status("circle", cfg)[0] == "caption_too_short"
    assert caption_status("a b", cfg)[0] == "caption_too_short"  # 3 chars
    assert caption_status("one two three four five six", cfg)[0] == "caption_too_long"
    assert caption_status("a " + "x" * 40, cfg)[0] == "caption_too_long"
    status, message = caption_status("one two three four five six", cfg)
    assert message == "6 words, 27 chars"
