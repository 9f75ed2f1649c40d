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


def hanzi_of(codec, lead_bytes, trail_bytes):
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
    data-free orders tried, this one gave the fewest [UNK] on 《西游记》 (docs/BENCHMARKS.md).
    A novel in traditional characters wants its own vocabulary: `cache/make_vocab.py --from_json`.
    """
    punctuation = list(CHINESE_PUNCTUATION) + CJK_SYMBOLS + FULLWIDTH_FORMS
    big5_trails = list(range(0x40, 0x7F)) + list(range(0xA1, 0xFF))
    hanzi = (hanzi_of("gb2312", range(0xB0, 0xF8), range(0xA1, 0xFF))
             + hanzi_of("big5", range(0xC9, 0xFA), big5_trails)
             + hanzi_of("gbk", range(0x81, 0xFF), range(0x40, 0xFF)))
    tokens = _unique(SPECIAL_TOKENS + ASCII_TOKENS + ASCII_CONTINUATIONS + punctuation + hanzi)
    if len(tokens) < size:
        raise ValueError(f"only {len(tokens)} tokens are available for a vocabulary of {size}")
    return tokens[:size]


def build_corpus_vocab(articles, min_count=1):
    """A vocabulary of the characters in `articles` (most frequent first) after the specials and ASCII."""
    counts = Counter(ch for article in articles for ch in article.lower() if not ch.isspace())
    chars = [ch for ch, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
    return _unique(SPECIAL_TOKENS + ASCII_TOKENS + ASCII_CONTINUATIONS + chars)


def segment(text):
    """Words of a line of Chinese text, by jieba's dictionary and HMM (rjieba: jieba-rs, maintained, 0.2 s for
    the whole 西游记)."""
    try:
        import rjieba
    except ImportError:
        raise UserError("--segment needs the word segmenter rjieba: pip install rjieba") from None
    return rjieba.cut(text)


def is_hanzi_word(token):
    return len(token) > 1 and all("\u3400" <= ch <= "\u9fff" for ch in token)


def build_word_vocab(articles, min_count=5):
    """The corpus vocabulary (every character, so nothing becomes [UNK] that a character model knows) followed by
    the words segment() finds at least `min_count` times, most frequent first."""
    counts = Counter(word.lower() for article in articles for line in article.split("\n") for word in segment(line))
    words = [word for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
             if n >= min_count and is_hanzi_word(word)]
    return _unique(build_corpus_vocab(articles) + words)


def is_segmented(tokenizer):
    """Whether the vocabulary holds words (a word vocabulary: text is segmented before its words are looked up)."""
    return getattr(tokenizer, "segmented", False)


def check_segment_flag(tokenizer, segment_flag, model_name):
    """generate.py/eval.py: the model's vocabulary decides; a --segment that contradicts it is refused."""
    if segment_flag and not is_segmented(tokenizer):
        raise UserError(f"--segment: {model_name} was trained on characters (its vocabulary has no words); "
                        f"drop --segment")
    if is_segmented(tokenizer) and not segment_flag:
        print(f"{model_name} has a word vocabulary: the text is segmented into words (as --segment)")


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


def vocab_tokens(tokenizer):
    """The vocabulary's tokens in id order."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab, key=vocab.get)


def vocab_hash(tokenizer):
    """A fingerprint of the vocabulary itself (tokens and their ids), wherever it was loaded from."""
    return hashlib.sha256("\n".join(vocab_tokens(tokenizer)).encode("utf-8")).hexdigest()


def for_gpt2(tokenizer, n_ctx=None):
    """The BERT-style tokenizer as a GPT-2 needs it, also when a user loads our folder with AutoTokenizer:
    no [CLS] ... [SEP] added around the text ([SEP] is a line break here), no token_type_ids (GPT-2 would add
    their embedding to its input), text decoded without spaces between characters, and `n_ctx` as
    model_max_length. Loaded again from a saved folder it stays so (a generic tokenizer class keeps
    tokenizer.json as it is; BertTokenizer would rebuild the [CLS] ... [SEP] template)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    check_specials(tokenizer.get_vocab(), getattr(tokenizer, "name_or_path", "the tokenizer"))
    backend = fitted_backend(Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
    limit = {"model_max_length": n_ctx} if n_ctx else {}
    fitted = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]",
                                     model_input_names=["input_ids", "attention_mask"], **limit)
    fitted.segmented = holds_words(backend, fitted.get_vocab())
    return fitted


def check_specials(vocab, name):
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise UserError(f"{name}: lacks the special tokens {' '.join(missing)}; it must be a BERT-style vocabulary")


def fitted_backend(backend):
    """A tokenizers.Tokenizer as for_gpt2 fits it: nothing added around a text, the markers decoded as line breaks
    and, for a BERT-style vocabulary, word pieces joined without spaces."""
    from tokenizers import decoders, processors

    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    markers = [decoders.Replace("[SEP]", "\n"), decoders.Replace("[CLS]", "\n\n"), decoders.Replace("[MASK]", "")]
    if is_byte_level(backend):  # GPT-2's BPE files: tokens are bytes, written as GPT-2's byte alphabet
        backend.decoder = decoders.Sequence(markers + [decoders.ByteLevel()])
    elif is_bpe(backend):  # ours (build_bpe): spaces kept as ▁
        backend.decoder = decoders.Sequence(markers + [decoders.Metaspace(replacement=SPACE, prepend_scheme="never")])
    else:
        backend.decoder = decoders.Sequence(markers + [decoders.Replace("##", ""), decoders.Fuse()])
    return backend


def holds_words(backend, vocab):
    """Whether a vocabulary is a word vocabulary (is_segmented)."""
    return not is_bpe(backend) and any(map(is_hanzi_word, vocab))


class SavedTokenizer:
    """A model folder's tokenizer.json read with the tokenizers library alone, fitted as for_gpt2 fits it, and the
    calls the sampler makes of a transformers tokenizer: generate.py and the servers never import transformers
    (1.2 s of generate.py's 3 s before its first character)."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        self.backend_tokenizer = fitted_backend(Tokenizer.from_file(str(path)))
        self.name_or_path = str(Path(path).parent)
        self.vocab = self.backend_tokenizer.get_vocab(with_added_tokens=True)
        check_specials(self.vocab, self.name_or_path)
        self.unk_token_id, self.pad_token_id = self.vocab["[UNK]"], self.vocab["[PAD]"]
        self.segmented = holds_words(self.backend_tokenizer, self.vocab)

    def __len__(self):
        return len(self.vocab)

    def __call__(self, texts, add_special_tokens=False):
        encodings = self.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [encoding.ids for encoding in encodings]}

    def get_vocab(self):
        return dict(self.vocab)

    def convert_tokens_to_ids(self, token):
        return self.vocab.get(token, self.unk_token_id)

    def convert_ids_to_tokens(self, ids):
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    def decode(self, ids):
        return self.backend_tokenizer.decode(ids, skip_special_tokens=False)


SPACE = "\u2581"  # how a BPE vocabulary writes a space


def is_bpe(tokenizer):
    """Whether a tokenizer (or its tokenizers.Tokenizer backend) has BPE tokens rather than a BERT-style vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return type(backend.model).__name__ == "BPE"


def is_byte_level(tokenizer):
    """Whether a BPE tokenizer works on bytes (GPT-2's): every text encodes, none of it to [UNK], and one character
    may take several tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return type(backend.pre_tokenizer).__name__ == "ByteLevel"


def load_gpt2_bpe(encoder_json, vocab_bpe):
    """GPT-2's byte-level BPE files (encoder.json and vocab.bpe, as OpenAI released them and the original's
    --bpe_token read them) as a tokenizers.Tokenizer, the article format's five special tokens added after its
    own tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    for flag, path in (("--encoder_json", encoder_json), ("--vocab_bpe", vocab_bpe)):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: file not found; give GPT-2's BPE files (encoder.json and vocab.bpe), "
                            f"or drop --encoder_json and --vocab_bpe to train a BPE on the corpus")
    try:
        model = models.BPE.from_file(str(encoder_json), str(vocab_bpe))
    except Exception as error:  # the library's message names no file
        raise UserError(f"--encoder_json {encoder_json} --vocab_bpe {vocab_bpe}: not GPT-2 BPE files (a JSON map "
                        f"of tokens to ids and a list of merges, one pair a line): {error}") from None
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def build_bpe(articles, vocab_size):
    """A character-level BPE tokenizer trained on `articles` with the `tokenizers` library: every character of the
    corpus is a token of its own (so nothing it holds becomes [UNK]), merges never cross punctuation or spaces, and
    the five special tokens of the article format come first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()  # as the BERT-style vocabularies do
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never"), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never")
    lines = [line for article in articles for line in article.lower().split("\n")]
    alphabet = sorted({ch for line in lines for ch in line if not ch.isspace()} | set(ASCII_TOKENS) | {SPACE})
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size, len(SPECIAL_TOKENS) + len(alphabet)),
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    return tokenizer


def folder_tokenizer(folder, sampling=False):
    """The tokenizer saved in a model folder (ours: tokenizer.json; the Hugging Face layout: tokenizer.json, or
    vocab.txt with or without a tokenizer_config.json), or None if the folder has no vocabulary. `sampling`: a
    tokenizer.json as a SavedTokenizer (only the calls sampling makes; nothing to save or train with)."""
    folder = Path(folder)
    if sampling and (folder / "tokenizer.json").is_file():
        return SavedTokenizer(folder / "tokenizer.json")
    from transformers import AutoTokenizer, BertTokenizer

    if (folder / "tokenizer.json").is_file():
        return for_gpt2(AutoTokenizer.from_pretrained(folder))
    if (folder / "vocab.txt").is_file():
        read_vocab(folder / "vocab.txt")  # a clear message for a vocabulary without the BERT specials
        # AutoTokenizer would follow config.json's model_type to GPT-2's tokenizer, which has no vocab.txt.
        return for_gpt2(BertTokenizer.from_pretrained(folder))
    return None


def load_tokenizer(path):
    """The fast (Rust) BERT tokenizer over a vocab file (any BERT-style layout: the special tokens are found by
    name), or the one saved in a model or tokenizer folder."""
    from transformers import BertTokenizer

    path = Path(path)
    if path.is_dir():
        tokenizer = folder_tokenizer(path)
        if tokenizer is None:
            raise UserError(f"{path}: a folder with no vocabulary in it (no tokenizer.json or vocab.txt); give the "
                            f"vocabulary file, e.g. --tokenizer_path cache/vocab_small.txt")
        return tokenizer
    if path.suffix == ".json":  # a tokenizers file, e.g. a BPE made by `cache/make_vocab.py --bpe`
        from transformers import PreTrainedTokenizerFast

        if not path.is_file():
            raise UserError(f"{path}: tokenizer file not found; make one with `python cache/make_vocab.py --bpe "
                            f"--from_json data/train.json --output {path}`")
        return for_gpt2(PreTrainedTokenizerFast(tokenizer_file=str(path), unk_token="[UNK]"))
    tokens = read_vocab(path)
    # `vocab=` (a dict) is the argument; transformers 5 silently ignores `vocab_file=`.
    return for_gpt2(BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}))
