"""Vocabularies (BERT-style, one token a line) and the fast tokenizer built from them."""
import hashlib
import string
from collections import Counter
from pathlib import Path

from .errors import UserError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEFAULT_VOCAB_SIZE = 13317  # the seed's vocab_small.txt, so config/model_config_small.json has 81,894,144 parameters
ASCII_TOKENS = [c for c in string.printable if not c.isspace() and not c.isupper()]
ASCII_CONTINUATIONS = ["##" + c for c in string.ascii_lowercase + string.digits]

# Punctuation and symbols of Chinese text. Upper-case letters are left out: the tokenizer lower-cases.
CHINESE_PUNCTUATION = "，。、；：？！“”‘’（）《》〈〉【】〔〕「」『』〖〗—–…‥·‧•※‰′″‖─│×÷°±§￥～"
CJK_SYMBOLS = [chr(c) for c in range(0x3001, 0x3040)]  # 、。〃…〿 (U+3000, the ideographic space, is whitespace)
FULLWIDTH_FORMS = [chr(c) for c in range(0xFF01, 0xFF66) if not "Ａ" <= chr(c) <= "Ｚ"]


def _hanzi_of(codec, lead_bytes, trail_bytes):
    """The CJK ideographs of a double-byte codec, in code order."""
    found = []
    for lead in lead_bytes:
        for trail in trail_bytes:
            try:
                ch = bytes([lead, trail]).decode(codec)
            except UnicodeDecodeError:
                continue
            if len(ch) == 1 and "\u4e00" <= ch <= "\u9fff":
                found.append(ch)
    return found


def _unique(tokens):
    return list(dict.fromkeys(tokens))


def build_default_vocab(size=DEFAULT_VOCAB_SIZE):
    """The project's default vocabulary, built deterministically from code tables alone.

    Order: BERT specials; ASCII with `##` continuations for letters and digits; Chinese and
    full-width punctuation; the 6,763 GB2312 hanzi; then Big5's level-2 hanzi (the rarer ones
    that classical novels use), then the rest of GBK's, in code order, until `size`. Of the
    data-free orders tried, this one gave the fewest [UNK] on 《西游记》 (docs/RESULTS.md).
    A novel in traditional characters wants its own vocabulary: `cache/make_vocab.py --from_json`.
    """
    punctuation = list(CHINESE_PUNCTUATION) + CJK_SYMBOLS + FULLWIDTH_FORMS
    big5_trails = list(range(0x40, 0x7F)) + list(range(0xA1, 0xFF))
    hanzi = (_hanzi_of("gb2312", range(0xB0, 0xF8), range(0xA1, 0xFF))
             + _hanzi_of("big5", range(0xC9, 0xFA), big5_trails)
             + _hanzi_of("gbk", range(0x81, 0xFF), range(0x40, 0xFF)))
    tokens = _unique(SPECIAL_TOKENS + ASCII_TOKENS + ASCII_CONTINUATIONS + punctuation + hanzi)
    if len(tokens) < size:
        raise ValueError(f"only {len(tokens)} tokens are available for a vocabulary of {size}")
    return tokens[:size]


def build_corpus_vocab(articles, min_count=1):
    """A vocabulary of the characters in `articles` (most frequent first) after the specials and ASCII."""
    counts = Counter(ch for article in articles for ch in article.lower() if not ch.isspace())
    chars = [ch for ch, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
    return _unique(SPECIAL_TOKENS + ASCII_TOKENS + ASCII_CONTINUATIONS + chars)


def write_vocab(tokens, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(t + "\n" for t in tokens), encoding="utf-8")


def read_vocab(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: vocabulary not found; use --tokenizer_path cache/vocab_small.txt or build one "
                        f"with `python cache/make_vocab.py`")
    tokens = path.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    missing = [t for t in ("[UNK]", "[SEP]", "[CLS]", "[MASK]", "[PAD]") if t not in tokens]
    if missing:
        raise UserError(f"{path}: lacks the special tokens {' '.join(missing)}; it must be a BERT-style "
                        f"vocabulary, one token a line")
    return tokens


def vocab_hash(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_tokenizer(path):
    """The fast (Rust) BERT tokenizer over a vocab file or a saved model/tokenizer folder."""
    from transformers import AutoTokenizer, BertTokenizer

    path = Path(path)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(path)
    tokens = read_vocab(path)
    # `vocab=` (a dict) is the argument; transformers 5 silently ignores `vocab_file=`.
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


def encode_articles(tokenizer, articles):
    """Token ids of each article as [MASK] text [CLS], each newline as [SEP]. Lines are encoded in one batch."""
    lines = [line for article in articles for line in article.split("\n")]
    encoded = iter(tokenizer(lines, add_special_tokens=False)["input_ids"])
    mask, cls, sep = (tokenizer.convert_tokens_to_ids(t) for t in ("[MASK]", "[CLS]", "[SEP]"))
    result = []
    for article in articles:
        ids = [mask]
        for i in range(article.count("\n") + 1):
            if i:
                ids.append(sep)
            ids += next(encoded)
        ids.append(cls)
        result.append(ids)
    return result
