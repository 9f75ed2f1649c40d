"""Reading novels (encoding detection), splitting them into articles, and cleaning articles."""
import itertools
import json
import re
import unicodedata
from collections import Counter
from functools import cache
from pathlib import Path

from .errors import UserError
from .vocab import hanzi_of

BOMS = [  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
]

# A heading line: 第 + a number in Chinese or Arabic digits + a unit (回, 章, 节, 卷, …), short.
CHAPTER_HEADING = re.compile(
    r"^[ \t\u3000]*(第[0-9０-９一二三四五六七八九十百千万零〇两壹贰叁肆伍陆柒捌玖拾佰仟]+[回章节卷集部篇])"
    r"(?:[ \t\u3000:：].*)?$"
)
MAX_HEADING_CHARS = 60


# Double-byte encodings whose bytes often decode as GB18030 without an error, into the wrong characters.
OTHER_CJK_ENCODINGS = {"big5": "Big5 (traditional Chinese)", "cp950": "Big5 (traditional Chinese)",
                       "big5hkscs": "Big5-HKSCS (traditional Chinese)", "shift_jis": "Shift-JIS (Japanese)",
                       "cp932": "Shift-JIS (Japanese)", "euc_jp": "EUC-JP (Japanese)", "euc_kr": "EUC-KR (Korean)",
                       "cp949": "EUC-KR (Korean)"}
DETECTION_MIN_BYTES = 1000  # below this the detector mistakes real GBK text for Korean or Big5 (measured)


@cache
def gb2312_hanzi():
    return set(hanzi_of("gb2312", range(0xB0, 0xF8), range(0xA1, 0xFF)))


def looks_like_mojibake(text):
    """GB18030-decoded text that was something else: private-use characters, or a fifth or more of its hanzi
    outside GB2312's 6,763 (a Chinese novel in GBK has almost none there)."""
    if any(unicodedata.category(ch) == "Co" for ch in text):
        return True
    hanzi = [ch for ch in text if "\u3400" <= ch <= "\u9fff"]
    common = gb2312_hanzi()
    return bool(hanzi) and sum(ch not in common for ch in hanzi) >= 0.2 * len(hanzi)


def detect_other_cjk(data):
    """charset-normalizer's best guess among the other CJK encodings, or None."""
    try:
        from charset_normalizer import from_bytes
    except ImportError:
        return None
    best = from_bytes(data, cp_isolation=["gb18030", *OTHER_CJK_ENCODINGS]).best()
    return best.encoding if best is not None and best.encoding in OTHER_CJK_ENCODINGS else None


def decode_bytes(data, name):
    """Decode a novel's bytes; return (text, encoding). Raise UserError naming `name` if impossible.

    UTF-8 (with or without a byte-order mark), UTF-16/32 with one, GBK/GB18030; Big5, Shift-JIS and EUC-KR,
    whose bytes mostly decode as GB18030 too, are told apart by charset-normalizer where GB18030 gives
    mojibake or the file is long enough for its judgement.
    """
    for bom, encoding in BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), encoding
            except UnicodeDecodeError as error:
                raise UserError(f"{name}: starts with a {encoding} byte-order mark but byte "
                                f"{error.start} is not valid {encoding}; re-save the file as UTF-8") from None
    if b"\x00" in data:
        raise UserError(f"{name}: contains NUL bytes, so it looks like a binary file, not a text "
                        f"novel; remove it from the input or convert it to UTF-8 text")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as utf8_error:
        first_invalid = utf8_error.start
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError:
        text = None
    if text is None or looks_like_mojibake(text) or len(data) >= DETECTION_MIN_BYTES:
        other = detect_other_cjk(data)
        if other:
            return data.decode(other), OTHER_CJK_ENCODINGS[other]
    if text is None:
        raise UserError(f"{name}: is neither UTF-8 (invalid byte at offset {first_invalid}) nor GBK/GB18030, Big5, "
                        f"Shift-JIS or EUC-KR; re-save it as UTF-8 (e.g. `iconv -f BIG5 -t UTF-8`)")
    if looks_like_mojibake(text):
        raise UserError(f"{name}: decodes as GBK/GB18030 only into unlikely characters (private-use or rare ones): "
                        f"it is in another encoding; re-save it as UTF-8 (e.g. `iconv -f BIG5 -t UTF-8`)")
    return text, "gb18030"


def read_novel(path):
    """Read a .txt novel with its encoding detected; line endings become \\n."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except PermissionError:
        raise UserError(f"{path}: permission denied; make it readable (chmod +r)") from None
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror})") from None
    text, encoding = decode_bytes(data, path)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise UserError(f"{path}: is empty; put the novel's text in it or remove it")
    return text, encoding


ORIGINAL_PIECE = re.compile(r"tokenized_train_\d+\.txt")


def not_a_novel(path):
    """Why a .txt file found in a folder is not a novel (the project's own outputs, the original's tokenized
    pieces), or None."""
    if ORIGINAL_PIECE.fullmatch(path.name):
        return "tokenized pieces of the original GPT2-Chinese"
    if (path.parent / "manifest.json").is_file():
        return "beside tokenized pieces"
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            head = {f.readline().strip() for _ in range(200)}
    except OSError:
        return None
    if {"[UNK]", "[CLS]", "[SEP]"} <= head:
        return "a vocabulary"
    return None


def find_txt_files(paths, say=print):
    """The .txt files named, or found (sorted, recursively) in the folders named, leaving out (and naming)
    the files in those folders that are not novels."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            try:
                found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            except PermissionError as error:
                raise UserError(f"{error.filename}: permission denied while looking for .txt files; "
                                f"make the folder readable (chmod +rx)") from None
            for txt in found:
                reason = not_a_novel(txt)
                if reason:
                    say(f"{txt}: skipped ({reason}, not a novel)")
                else:
                    files.append(txt)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not files:
        raise UserError(f"no .txt file found in {', '.join(map(str, paths))}; put your novel there as a "
                        f".txt file (UTF-8 or GBK) or name the file on the command line")
    return files


def is_heading(line):
    return len(line.strip()) <= MAX_HEADING_CHARS and CHAPTER_HEADING.match(line) is not None


def split_articles(text, chunk_chars=3000):
    """Split a novel into articles at chapter headings (第…回/章/…), else into paragraph-aligned chunks.

    Text before the first heading (a preface) is an article of its own.
    """
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if is_heading(line)]
    if starts:
        bounds = ([0] if starts[0] > 0 else []) + starts + [len(lines)]
        articles = ["\n".join(lines[a:b]).strip("\n") for a, b in itertools.pairwise(bounds)]
    else:
        articles, current, size = [], [], 0
        for line in lines:
            current.append(line)
            size += len(line) + 1
            if size >= chunk_chars:
                articles.append("\n".join(current).strip("\n"))
                current, size = [], 0
        articles.append("\n".join(current).strip("\n"))
    return [a for a in articles if a.strip()]


# ---- cleaning -------------------------------------------------------------------------------

SPACE_LIKE = set("\t\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029")
ZERO_WIDTH = {"\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u180e"}


def _removal_reason(ch):
    """Why `ch` must go (a category name), or None if it stays. Newlines are handled by the caller."""
    code = ord(ch)
    if ch in ZERO_WIDTH:
        return "zero-width or BOM"
    if ch == "\ufffd":
        return "U+FFFD replacement"
    if 0xD800 <= code <= 0xDFFF:
        return "lone surrogate"
    if code < 0x20 or code == 0x7F:
        return "C0 control"
    if 0x80 <= code <= 0x9F:
        return "C1 control"
    if unicodedata.category(ch) == "Cf":
        return "invisible format"
    return None


def clean_article(text, removed):
    """Clean one article; count what was removed into the Counter `removed`.

    Keeps every \\n (train.py turns them into [SEP]) but collapses blank lines; tabs and other
    Unicode spaces become one ASCII space; indentation and trailing spaces are removed.
    Idempotent: clean_article(clean_article(x)) == clean_article(x).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    table = {}  # decided once per distinct character: a novel has a few thousand
    for ch in set(text) - {"\n"}:
        if ch in SPACE_LIKE or unicodedata.category(ch) == "Zs":
            table[ord(ch)] = " "
        else:
            reason = _removal_reason(ch)
            if reason:
                table[ord(ch)] = None
                removed[reason] += text.count(ch)
    text = text.translate(table)
    lines = [re.sub(" {2,}", " ", line).strip(" ") for line in text.split("\n")]
    return "\n".join(line for line in lines if line)


def clean_articles(articles):
    """Clean every article; drop those left empty. Return (cleaned, Counter of removals, dropped count)."""
    removed = Counter()
    cleaned = [clean_article(a, removed) for a in articles]
    kept = [a for a in cleaned if a]
    return kept, removed, len(cleaned) - len(kept)


def load_articles(path, repair=False):
    """Load a JSON list of strings (input.json / train.json) with clear errors.

    repair=True also takes raw control characters (line breaks, carriage returns, tabs, NUL) written
    unescaped inside the strings, which strict JSON forbids: what the original's clr_ctrl.py was for.
    Returns the articles, or with repair=True (articles, whether such characters were found).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: is not UTF-8 (byte {error.start}); it should be the JSON written by "
                        f"txt_to_json.py") from None
    repaired = False
    try:
        articles = json.loads(text)
    except json.JSONDecodeError as error:
        if not (repair and error.msg == "Invalid control character at"):
            raise UserError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}; "
                            f"fix it there or regenerate it with txt_to_json.py") from None
        try:
            articles, repaired = json.loads(text, strict=False), True
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}; "
                            f"fix it there or regenerate it with txt_to_json.py") from None
    if not isinstance(articles, list):
        raise UserError(f"{path}: must be a JSON list of strings (one per article), "
                        f"but it is a JSON {type(articles).__name__}")
    for i, article in enumerate(articles):
        if not isinstance(article, str):
            raise UserError(f"{path}: item {i} is a {type(article).__name__}, not a string; "
                            f"the file must be a JSON list of strings (one per article)")
    return (articles, repaired) if repair else articles
