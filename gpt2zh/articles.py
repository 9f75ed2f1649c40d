"""The article format of the token stream, the original GPT2-Chinese's: [MASK] starts an article, [CLS] ends
it, [SEP] is a line break. Text -> ids for training and prefixes, ids -> text for samples."""
import re

from .vocab import is_bpe, is_byte_level, is_segmented, segment

ARTICLE_START, ARTICLE_END, LINE_BREAK = "[MASK]", "[CLS]", "[SEP]"
MARKERS = re.compile(r"(\[CLS\]|\[SEP\]|\[MASK\])")


def marker_ids(tokenizer):
    """(article start, article end, line break) ids in this vocabulary."""
    return tuple(tokenizer.convert_tokens_to_ids(t) for t in (ARTICLE_START, ARTICLE_END, LINE_BREAK))


def encode_lines(tokenizer, lines):
    """Token ids of each line (no markers). A word vocabulary's words where the segmenter finds them, the other
    words as the tokenizer splits them (into characters); otherwise the tokenizer's own tokens."""
    if not is_segmented(tokenizer):
        return tokenizer(lines, add_special_tokens=False)["input_ids"] if lines else []
    vocab = tokenizer.get_vocab()
    words = [segment(line) for line in lines]
    unknown = sorted({word for line in words for word in line if word.lower() not in vocab})
    pieces = tokenizer(unknown, add_special_tokens=False)["input_ids"] if unknown else []
    split = dict(zip(unknown, pieces, strict=True))
    return [[i for word in line for i in ([vocab[word.lower()]] if word.lower() in vocab else split[word])]
            for line in words]


def encode_articles(tokenizer, articles):
    """Token ids of each article as [MASK] text [CLS], each newline as [SEP]. Lines are encoded in one batch."""
    lines = [line for article in articles for line in article.split("\n")]
    encoded = iter(encode_lines(tokenizer, lines))
    start, end, line_break = marker_ids(tokenizer)
    result = []
    for article in articles:
        ids = [start]
        for i in range(article.count("\n") + 1):
            if i:
                ids.append(line_break)
            ids += next(encoded)
        ids.append(end)
        result.append(ids)
    return result


def encode_prefix(tokenizer, prefix, no_wordpiece=False):
    """A prefix typed by the user: the markers as written ([CLS] starts a new article, as in the original), a line
    break as [SEP] (as in training), the rest tokenized (with no_wordpiece, character by character)."""
    vocab = tokenizer.get_vocab()
    line_break = marker_ids(tokenizer)[2]
    ids = []
    for part in MARKERS.split(prefix):
        if part in vocab and MARKERS.fullmatch(part):
            ids.append(vocab[part])
            continue
        for number, line in enumerate(part.split("\n")):
            if number:
                ids.append(line_break)
            if no_wordpiece and not is_byte_level(tokenizer):
                ids += [vocab.get(c.lower(), tokenizer.unk_token_id) for c in line if not c.isspace()]
            elif line:
                ids += encode_lines(tokenizer, [line])[0]
    return ids


def missing_characters(tokenizer, prefix):
    """The characters of `prefix` that the vocabulary lacks (they would become [UNK]; bytes always encode)."""
    if is_byte_level(tokenizer):
        return []
    vocab = tokenizer.get_vocab()
    return sorted({c for c in MARKERS.sub("", prefix) if not c.isspace() and c.lower() not in vocab})


def is_word(token):
    return re.fullmatch(r"[a-z]+", token) is not None


def ids_to_text(tokenizer, ids):
    """The original's output format: [CLS] a blank line, [SEP] a newline, [MASK] dropped, ## joined,
    a space kept between English words (BPE tokens: their own spaces)."""
    if is_bpe(tokenizer):
        return tokenizer.decode(ids).strip()  # for_gpt2's decoder turns the markers into line breaks
    tokens = tokenizer.convert_ids_to_tokens(ids)
    pieces = []
    for i, token in enumerate(tokens):
        if token == ARTICLE_START:
            pieces.append("")
        elif token == ARTICLE_END:
            pieces.append("\n\n")
        elif token == LINE_BREAK:
            pieces.append("\n")
        elif i + 1 < len(tokens) and is_word(token.removeprefix("##")) and is_word(tokens[i + 1]):
            pieces.append(token + " ")
        else:
            pieces.append(token)
    return "".join(pieces).replace("##", "").strip()


class TextStream:
    """The text of a growing sequence of ids, handed out in the pieces it gains: for showing a sample as it is
    sampled. ids_to_text only ever appends as ids are added (it strips the ends, which the next id restores), except
    where byte tokens end inside a character: that character's stand-in (U+FFFD) waits for its last byte. Each id
    decodes the last WINDOW ids only, with and without it: the same work for the 2,000th character as for the first
    (decoding the whole text each time cost 2.45 s over 1,000 characters, growing with the square of the length)."""

    WINDOW = 16  # ids around the newest that can change how it reads: a character's bytes, a word's pieces

    def __init__(self, tokenizer, ids=()):
        self.tokenizer, self.ids = tokenizer, list(ids)
        self.text = ids_to_text(tokenizer, self.ids).rstrip("\ufffd")

    def push(self, token_id):
        """The text `token_id` adds."""
        start = max(0, len(self.ids) - self.WINDOW)
        before = ids_to_text(self.tokenizer, self.ids[start:]).rstrip("\ufffd")
        if not before.strip():  # line breaks alone, stripped away: the whole text tells what the next id adds
            start, before = 0, self.text
        self.ids.append(token_id)
        after = ids_to_text(self.tokenizer, self.ids[start:]).rstrip("\ufffd")
        added = after[len(before):] if after.startswith(before) else ""
        self.text += added
        return added
