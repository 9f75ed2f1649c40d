import json
import unicodedata
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2zh.text import clean_article, decode_bytes

CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
ANY = st.characters(codec="utf-8") | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXTS = st.text(st.one_of(CJK, ANY, st.sampled_from("\n\r\t \u3000\u200b\ufeff\x00\x85")), max_size=200)


def is_cjk(ch):
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_cleaned_text_is_valid_json_without_controls_and_idempotent(text):
    cleaned = clean_article(text, Counter())
    encoded = json.dumps([cleaned], ensure_ascii=False).encode("utf-8")  # lone surrogates would fail here
    assert json.loads(encoded) == [cleaned]
    assert all(ch == "\n" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs") for ch in cleaned)
    assert clean_article(cleaned, Counter()) == cleaned
    assert [c for c in cleaned if is_cjk(c)] == [c for c in text if is_cjk(c)]


GB2312 = [bytes([lead, trail]).decode("gb2312") for lead in range(0xB0, 0xD7) for trail in range(0xA1, 0xFF)]  # level 1


@settings(max_examples=300, deadline=None)
@given(st.text(st.one_of(CJK, st.characters(min_codepoint=0x20, max_codepoint=0x7E), st.just("\n")), min_size=1,
               max_size=200),
       st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "gb18030"]), st.lists(st.sampled_from(GB2312), max_size=200))
def test_every_detected_encoding_round_trips(text, encoding, gbk_hanzi):
    if encoding == "gb18030":
        # A GBK novel is made of common hanzi (random rare ones are what mojibake looks like). A few GBK byte
        # pairs are valid UTF-8 too, so a text of only those is ambiguous; a novel always has common
        # characters such as 的 (B5 C4, never valid UTF-8) that settle it.
        text = "".join(c for c in text if not is_cjk(c)) + "".join(gbk_hanzi) + "的"
    decoded, used = decode_bytes(text.encode(encoding), "novel.txt")
    assert decoded == text
    assert used == encoding or (encoding != "utf-16" and text.isascii())
