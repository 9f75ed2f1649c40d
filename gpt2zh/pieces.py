"""Tokenized pieces: the corpus as binary token arrays in data/tokenized/, with a manifest of their origin."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .articles import encode_articles
from .errors import UserError
from .fileio import write_json_atomic
from .text import load_articles
from .vocab import vocab_hash

FORMAT_VERSION = 2  # 1 was the original's space-separated text files
MANIFEST = "manifest.json"


def corpus_fingerprint(raw_data_path):
    data = Path(raw_data_path).read_bytes()
    return {"corpus_sha256": hashlib.sha256(data).hexdigest(), "corpus_bytes": len(data)}


def expected_manifest(raw_data_path, tokenizer, num_pieces, min_length):
    return {"format_version": FORMAT_VERSION, "vocab_sha256": vocab_hash(tokenizer),
            **corpus_fingerprint(raw_data_path), "num_pieces": num_pieces, "min_length": min_length}


def build_pieces(raw_data_path, tokenizer, vocab_name, tokenized_data_path, num_pieces, min_length):
    """Tokenize train.json into `num_pieces` uint16 arrays; return the manifest.

    `vocab_name` names the tokenizer's vocabulary in messages. Articles shorter than `min_length` characters
    are skipped; each kept article becomes
    [MASK] … [CLS] with [SEP] for newlines; the token stream is cut into `num_pieces` equal parts.
    """
    if num_pieces < 1:
        raise UserError(f"--num_pieces {num_pieces}: must be at least 1")
    articles = load_articles(raw_data_path)
    kept = [a for a in articles if len(a) >= min_length]
    if not kept:
        longest = max(map(len, articles), default=0)
        raise UserError(f"{raw_data_path}: all {len(articles)} articles are shorter than --min_length {min_length} "
                        f"characters (the longest has {longest}); lower --min_length")
    ids = np.fromiter((i for article in encode_articles(tokenizer, kept) for i in article), dtype=np.int64)
    if num_pieces > len(ids):
        raise UserError(f"--num_pieces {num_pieces}: the corpus has only {len(ids)} tokens; use fewer pieces")
    dtype = np.uint16 if len(tokenizer) <= 65536 else np.uint32
    out = Path(tokenized_data_path)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("tokenized_train_*"):
        old.unlink(missing_ok=True)  # another machine's process may be writing the same folder (several nodes)
    (out / MANIFEST).unlink(missing_ok=True)  # no manifest while the pieces are half written
    sizes = []
    for i, piece in enumerate(np.array_split(ids, num_pieces)):
        partial = out / f".tokenized_train_{i}.{os.getpid()}.npy"
        np.save(partial, piece.astype(dtype))
        os.replace(partial, out / f"tokenized_train_{i}.npy")  # whole, whoever else writes it
        sizes.append(len(piece))
    unk = int((ids == tokenizer.unk_token_id).sum())
    manifest = {**expected_manifest(raw_data_path, tokenizer, num_pieces, min_length),
                "tokens": int(len(ids)), "piece_tokens": sizes, "articles": len(kept),
                "characters": sum(map(len, kept)),
                "articles_skipped": len(articles) - len(kept), "unk_tokens": unk}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def check_pieces(raw_data_path, tokenizer, vocab_name, tokenized_data_path, num_pieces, min_length):
    """Return the manifest if the pieces match the corpus, vocabulary and flags; else say what changed."""
    out = Path(tokenized_data_path)
    path = out / MANIFEST
    if not path.is_file():
        if list(out.glob("tokenized_train_*.txt")):
            raise UserError(f"{out}: holds tokenized pieces of the original GPT2-Chinese format; add --raw to "
                            f"tokenize {raw_data_path} again")
        raise UserError(f"{out}: no tokenized pieces; add --raw to tokenize {raw_data_path}")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not Path(raw_data_path).is_file():
        raise UserError(f"{raw_data_path}: not found; it is needed to check that {out} is up to date")
    expected = expected_manifest(raw_data_path, tokenizer, num_pieces, min_length)
    names = {"format_version": "the piece format", "vocab_sha256": f"the vocabulary ({vocab_name})",
             "corpus_sha256": f"the corpus {raw_data_path}", "corpus_bytes": f"the corpus {raw_data_path}",
             "num_pieces": "--num_pieces", "min_length": "--min_length"}
    changed = list(dict.fromkeys(names[k] for k, v in expected.items() if manifest.get(k) != v))
    if changed:
        raise UserError(f"{out}: the tokenized pieces are stale: {', '.join(changed)} changed since they were "
                        f"made; add --raw to tokenize again")
    return manifest


def load_pieces(tokenized_data_path, manifest):
    out = Path(tokenized_data_path)
    return [np.load(out / f"tokenized_train_{i}.npy", mmap_mode="r") for i in range(manifest["num_pieces"])]


def window_starts(length, n_ctx, stride):
    """Start offsets of the training windows of a piece: every `stride` tokens, plus one ending at the
    piece's end so no token is left out; a piece shorter than n_ctx is one (shorter) window."""
    if length <= n_ctx:
        return [0]
    starts = list(range(0, length - n_ctx + 1, stride))
    if starts[-1] + n_ctx < length:
        starts.append(length - n_ctx)
    return starts


def make_windows(pieces, n_ctx, stride):
    """All windows as (piece index, start, length) rows: an int64 array of shape [n_windows, 3]."""
    rows = [(p, s, min(n_ctx, len(piece) - s)) for p, piece in enumerate(pieces)
            for s in window_starts(len(piece), n_ctx, stride)]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def shifted_windows(windows, piece_lengths, shift, rng):
    """Every window's start moved on by 0 to `shift` - 1 tokens drawn by `rng`, and back where it would run past its
    piece's end; the windows keep their lengths and number. [n_windows, 3] like make_windows'."""
    starts = windows[:, 1] + rng.integers(0, shift, len(windows))
    starts = np.minimum(starts, piece_lengths[windows[:, 0]] - windows[:, 2])
    return np.column_stack([windows[:, 0], starts, windows[:, 2]])


def make_batch(pieces, windows, pad_id):
    """Stack windows into input_ids and labels (-100 on padding), both [batch, longest window]."""
    longest = int(windows[:, 2].max())
    input_ids = np.full((len(windows), longest), pad_id, dtype=np.int64)
    labels = np.full((len(windows), longest), -100, dtype=np.int64)
    for row, (p, start, length) in enumerate(windows):
        input_ids[row, :length] = pieces[p][start:start + length]
        labels[row, :length] = input_ids[row, :length]
    return input_ids, labels


def noise_inputs(input_ids, labels, p, unigram, rng):
    """Data noising (Xie et al. 2017, "unigram noising"): each input token (padding aside) becomes, with probability
    `p`, a token drawn from the corpus's unigram distribution `unigram` [vocab]; the labels keep the true text, so
    the model learns to predict it from a slightly corrupted context. In place on input_ids [batch, T]."""
    hit = (rng.random(input_ids.shape) < p) & (labels != -100)
    input_ids[hit] = rng.choice(len(unigram), size=int(hit.sum()), p=unigram)
    return input_ids
