"""What a training run starts from: the model config and vocabulary its flags name, and its data — the tokenized
pieces, the training windows over them and the held-out token ids."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoints
from .articles import encode_articles, ids_to_text
from .errors import UserError
from .model import context_length, load_config
from .pieces import build_pieces, check_pieces, load_pieces, make_windows
from .text import load_articles
from .vocab import (
    SPECIAL_TOKENS,
    build_bpe,
    build_word_vocab,
    is_bpe,
    is_hanzi_word,
    is_segmented,
    load_gpt2_bpe,
    load_tokenizer,
    write_vocab,
)

DEFAULT_VOCAB = "cache/vocab_small.txt"
GPT2_BPE_FILES = ("tokenizations/encoder.json", "tokenizations/vocab.bpe")  # the original's defaults


def model_and_vocabulary(args, say, main_process=True):
    """(config, tokenizer, name of the config, name of the vocabulary): --pretrained_model's own config and
    vocabulary when it is given (a vocabulary given with --tokenizer_path must be the same), else
    --model_config and --tokenizer_path."""
    if args.pretrained_model:
        config, tokenizer = checkpoints.open_model_folder(args.pretrained_model, args.tokenizer_path,
                                                          "--pretrained_model")
        config_name = f"--pretrained_model {args.pretrained_model}"
        vocab_name = args.tokenizer_path or f"the vocabulary saved in {args.pretrained_model}"
        say(f"--pretrained_model {args.pretrained_model}: its own config (n_ctx {context_length(config)}, vocab_size "
            f"{config.vocab_size}; --model_config is not used) and {vocab_name} ({len(tokenizer)} tokens)")
        return config, tokenizer, config_name, vocab_name
    if args.bpe_token and args.segment:
        raise UserError("--bpe_token and --segment: choose one tokenization")
    if gpt2_bpe_files(args, explicit_only=True) and args.tokenizer_path:
        raise UserError(f"--tokenizer_path {args.tokenizer_path} and --encoder_json/--vocab_bpe: give one vocabulary")
    tokenizer_path = args.tokenizer_path or corpus_vocabulary(args, say, main_process)
    config, tokenizer = load_config(args.model_config), load_tokenizer(tokenizer_path)
    if args.bpe_token and not is_bpe(tokenizer):
        raise UserError(f"--bpe_token: --tokenizer_path {tokenizer_path} is not a BPE tokenizer; drop it to train one "
                        f"on the corpus, or make one with `python cache/make_vocab.py --bpe`")
    if args.segment and not is_segmented(tokenizer):
        raise UserError(f"--segment: --tokenizer_path {tokenizer_path} has no words; drop it to build a word "
                        f"vocabulary from the corpus, or make one with `python cache/make_vocab.py --segment`")
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"{tokenizer_path} has {len(tokenizer)} tokens but {args.model_config} has vocab_size "
                        f"{config.vocab_size}; set vocab_size to at least {len(tokenizer)} or use a matching "
                        f"vocabulary")
    return config, tokenizer, args.model_config, tokenizer_path


def gpt2_bpe_files(args, explicit_only=False):
    """(encoder.json, vocab.bpe) when the run uses GPT-2's BPE files, as the original's --bpe_token did: when they
    are given, or (unless explicit_only) when they lie at the original's default paths; else None."""
    given = (args.encoder_json, args.vocab_bpe) != GPT2_BPE_FILES
    if given and not args.bpe_token:
        raise UserError("--encoder_json/--vocab_bpe: GPT-2's BPE files are read only with --bpe_token; add it")
    present = [Path(f).is_file() for f in GPT2_BPE_FILES]
    if given or (args.bpe_token and not explicit_only and any(present)):
        return args.encoder_json, args.vocab_bpe
    return None


def corpus_vocabulary(args, say, main_process=True):
    """The vocabulary file a run uses when --tokenizer_path is not given: cache/vocab_small.txt for characters;
    for --bpe_token GPT-2's BPE files where there are some, else, as for --segment, one built from the corpus
    (with --raw); the latter two are kept beside the tokenized pieces (every process builds the same one, the first
    writes it)."""
    if not (args.bpe_token or args.segment):
        return DEFAULT_VOCAB
    path = Path(args.tokenized_data_path) / ("bpe_tokenizer.json" if args.bpe_token else "segment_vocab.txt")
    flag = "--bpe_token" if args.bpe_token else "--segment"
    files = gpt2_bpe_files(args)
    if files:
        tokenizer = load_gpt2_bpe(*files)
        write = lambda: tokenizer.save(str(path))  # noqa: E731
        say(f"--bpe_token: GPT-2's BPE files {files[0]} and {files[1]} ({tokenizer.get_vocab_size():,} tokens with "
            f"the 5 special tokens added) -> {path}")
    elif not args.raw:
        if not path.is_file():
            raise UserError(f"{flag}: no vocabulary in {args.tokenized_data_path}; add --raw to build one")
        return path
    else:
        write, what = vocabulary_from_corpus(args, path)
        say(f"{flag}: built {what} from {args.raw_data_path} -> {path}")
    if main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        write()
    return path


def vocabulary_from_corpus(args, path):
    """(a function writing it to `path`, what it is) for the BPE or word vocabulary built from --raw_data_path."""
    articles = [a for a in load_articles(args.raw_data_path) if len(a) >= args.min_length]
    if args.bpe_token:
        if args.bpe_vocab_size < len(SPECIAL_TOKENS) + 1:
            raise UserError(f"--bpe_vocab_size {args.bpe_vocab_size}: must be larger than the special tokens")
        tokenizer = build_bpe(articles, args.bpe_vocab_size)
        return (lambda: tokenizer.save(str(path))), f"a BPE of {tokenizer.get_vocab_size():,} tokens"
    tokens = build_word_vocab(articles, args.segment_min_count)
    return ((lambda: write_vocab(tokens, path)),
            f"a word vocabulary of {len(tokens):,} tokens ({sum(map(is_hanzi_word, tokens)):,} words)")


@dataclass
class TrainingData:
    """The corpus as a run reads it."""
    pieces: list  # token arrays
    windows: np.ndarray  # [n_windows, 3]: piece, start, length
    eval_ids: np.ndarray | None  # the held-out token stream, if there is one
    eval_chars: int | None  # its characters, for the loss per character
    unigram: np.ndarray | None  # the corpus's token frequencies, for --input_noise

    @property
    def tokens(self):
        return sum(len(p) for p in self.pieces)


def held_out_articles(args, tokenizer):
    """(ids, characters) of --eval_data_path's articles of --min_length or more."""
    articles = [a for a in load_articles(args.eval_data_path) if len(a) >= args.min_length]
    if not articles:
        raise UserError(f"--eval_data_path {args.eval_data_path}: no article of --min_length {args.min_length} "
                        f"characters or more")
    ids = np.array([i for a in encode_articles(tokenizer, articles) for i in a], dtype=np.int64)
    return ids, sum(map(len, articles))


def split_eval_tail(pieces, ratio):
    """Hold out the last `ratio` of the token stream: (training pieces, held-out ids)."""
    total = sum(len(p) for p in pieces)
    cut = int(total * (1 - ratio))
    train, held_out, offset = [], [], 0
    for piece in pieces:
        keep = max(0, min(len(piece), cut - offset))
        if keep:
            train.append(piece[:keep])
        held_out.append(piece[keep:])
        offset += len(piece)
    return train, np.concatenate(held_out)


def load_training_data(args, tokenizer, vocab_name, n_ctx, processes):
    """The pieces (tokenized first with --raw, by the first process of each machine), windows and held-out ids of
    a run."""
    say = processes.say
    eval_ids, eval_chars = held_out_articles(args, tokenizer) if args.eval_data_path else (None, None)
    if args.raw and processes.local_rank == 0:
        say(f"tokenizing {args.raw_data_path} into {args.num_pieces} pieces in {args.tokenized_data_path}")
        manifest = build_pieces(args.raw_data_path, tokenizer, vocab_name, args.tokenized_data_path,
                                args.num_pieces, args.min_length)
        say(f"  {manifest['tokens']:,} tokens from {manifest['articles']} articles "
            f"({manifest['articles_skipped']} shorter than --min_length {args.min_length} skipped), "
            f"[UNK] {100 * manifest['unk_tokens'] / manifest['tokens']:.3f}%")
    processes.barrier()
    manifest = check_pieces(args.raw_data_path, tokenizer, vocab_name, args.tokenized_data_path, args.num_pieces,
                            args.min_length)
    pieces = load_pieces(args.tokenized_data_path, manifest)
    if args.eval_ratio:
        pieces, eval_ids = split_eval_tail(pieces, args.eval_ratio)
        # stand-in for the articles' characters: a character token is one, [SEP] a newline; BPE tokens decoded
        eval_chars = len(ids_to_text(tokenizer, eval_ids.tolist())) if is_bpe(tokenizer) else len(eval_ids)
    unigram = None
    if args.input_noise:
        unigram = sum(np.bincount(piece, minlength=len(tokenizer)) for piece in pieces)[:len(tokenizer)]
        unigram = unigram / unigram.sum()
    data = TrainingData(pieces, make_windows(pieces, n_ctx, args.stride), eval_ids, eval_chars, unigram)
    if data.tokens < n_ctx:
        say(f"note: the corpus has only {data.tokens} tokens, fewer than n_ctx {n_ctx}; training on what there is")
    return data
