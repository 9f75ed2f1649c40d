"""The training loop: pieces -> shuffled windows -> AdamW steps, with checkpoints that survive anything."""
import copy
import math
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoints
from .articles import encode_articles, ids_to_text
from .console import progress_bar
from .curves import MetricsLog
from .devices import autocast_dtype, distributed_device, distributed_rank, pick_device, precision_name
from .errors import UserError
from .evaluation import evaluate, summarize
from .model import CausalLMLoss, build_model, choose_dropout_attention, context_length, count_parameters, load_config
from .pieces import build_pieces, check_pieces, load_pieces, make_batch, make_windows, noise_inputs
from .text import load_articles
from .vocab import (SPECIAL_TOKENS, build_bpe, build_word_vocab, is_bpe, is_hanzi_word, is_segmented, load_gpt2_bpe,
                    load_tokenizer, write_vocab)

DEFAULT_VOCAB = "cache/vocab_small.txt"
GPT2_BPE_FILES = ("tokenizations/encoder.json", "tokenizations/vocab.bpe")  # the original's defaults
ADAM_EPS = 1e-6  # the original's (transformers' old AdamW default); torch's default is 1e-8

# Flags that define the sequence of optimizer steps: a resumed run must use the same ones.
RUN_SETTINGS = ("model_config", "stride", "batch_size", "gradient_accumulation", "epochs", "num_pieces",
                "min_length", "lr", "warmup_steps", "lr_schedule", "weight_decay", "seed", "eval_ratio", "bpe_token",
                "bpe_vocab_size", "segment", "segment_min_count", "average_from", "input_noise")


class StopRequest:
    """SIGINT/SIGTERM ask the loop to save a checkpoint and stop after the current step;
    a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        tqdm.write(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                   f"(Ctrl-C again to stop at once)")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def validate(args, n_ctx, config_name):
    checks = [(args.stride <= 0 or args.stride > n_ctx, f"--stride {args.stride}: must be between 1 and n_ctx "
                                                          f"({n_ctx}) of {config_name}"),
              (args.log_step < 1, f"--log_step {args.log_step}: must be at least 1"),
              (args.num_pieces < 1, f"--num_pieces {args.num_pieces}: must be at least 1"),
              (args.epochs < 1, f"--epochs {args.epochs}: must be at least 1"),
              (args.batch_size < 1, f"--batch_size {args.batch_size}: must be at least 1"),
              (args.gradient_accumulation < 1, f"--gradient_accumulation {args.gradient_accumulation}: must be at least 1"),
              (args.lr <= 0, f"--lr {args.lr}: must be positive"),
              (not 0 <= args.eval_ratio < 1, f"--eval_ratio {args.eval_ratio}: must be in [0, 1)"),
              (not 0 <= args.average_from < 1, f"--average_from {args.average_from}: must be in [0, 1) (0: off)"),
              (not 0 <= args.input_noise < 1, f"--input_noise {args.input_noise}: must be in [0, 1) (0: off)"),
              (args.resume and args.overwrite, "--resume and --overwrite contradict each other; choose one"),
              (args.eval_ratio and args.eval_data_path, "--eval_ratio and --eval_data_path both name a held-out set; "
                                                        "choose one")]
    for failed, message in checks:
        if failed:
            raise UserError(message)


class WeightAverage:
    """A running uniform average of a model's weights from some step on (stochastic weight averaging), kept in
    fp32 in a copy of the model that can be evaluated and saved. Updated without reading anything back from the
    GPU (torch's AveragedModel checks its count on the device every step)."""

    def __init__(self, lm):
        self.model = copy.deepcopy(lm).requires_grad_(False)
        self.averaged = list(self.model.parameters())  # the same tensors for the whole run (loading copies into them)
        self.count = 0

    def update(self, lm):
        self.count += 1
        torch._foreach_lerp_(self.averaged, [p.detach() for p in lm.parameters()], 1 / self.count)

    def state_dict(self):
        return {"count": self.count, "weights": self.model.state_dict()}

    def load_state_dict(self, state):
        self.count = state["count"]
        self.model.load_state_dict(state["weights"])


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


def windows_per_rank(n_windows, world):
    return math.ceil(n_windows / world)


def epoch_order(n_windows, seed, epoch, rank, world):
    """This rank's window indices for an epoch: one shuffle shared by all ranks, dealt round-robin."""
    order = np.random.default_rng([seed, epoch]).permutation(n_windows)
    if world > 1:
        order = np.resize(order, windows_per_rank(n_windows, world) * world)  # wrap so every rank gets as many
    return order[rank::world]


def make_optimizer(model, args, device):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, eps=ADAM_EPS, fused=device.type in ("cpu", "cuda"))


def make_scheduler(optimizer, args, total_steps):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    schedule = get_cosine_schedule_with_warmup if args.lr_schedule == "cosine" else get_linear_schedule_with_warmup
    return schedule(optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=total_steps)


def to_device(tensor, device):
    """A copy from pinned memory does not wait for the GPU to finish its queue, as a pageable one does,
    so the next step is queued while this one runs."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def is_out_of_memory(error):
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error) \
        or "out of memory" in str(error).lower()


def model_and_vocabulary(args, say):
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
    tokenizer_path = args.tokenizer_path or corpus_vocabulary(args, say)
    config, tokenizer = load_config(args.model_config), load_tokenizer(tokenizer_path)
    if args.bpe_token and not is_bpe(tokenizer):
        raise UserError(f"--bpe_token: --tokenizer_path {tokenizer_path} is not a BPE tokenizer; drop it to train one "
                        f"on the corpus, or make one with `python cache/make_vocab.py --bpe`")
    if args.segment and not is_segmented(tokenizer):
        raise UserError(f"--segment: --tokenizer_path {tokenizer_path} has no words; drop it to build a word "
                        f"vocabulary from the corpus, or make one with `python cache/make_vocab.py --segment`")
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"{tokenizer_path} has {len(tokenizer)} tokens but {args.model_config} has vocab_size "
                        f"{config.vocab_size}; set vocab_size to at least {len(tokenizer)} or use a matching vocabulary")
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


def corpus_vocabulary(args, say):
    """The vocabulary file a run uses when --tokenizer_path is not given: cache/vocab_small.txt for characters;
    for --bpe_token GPT-2's BPE files where there are some, else, as for --segment, one built from the corpus
    (with --raw); the latter two are kept beside the tokenized pieces."""
    if not (args.bpe_token or args.segment):
        return DEFAULT_VOCAB
    path = Path(args.tokenized_data_path) / ("bpe_tokenizer.json" if args.bpe_token else "segment_vocab.txt")
    flag = "--bpe_token" if args.bpe_token else "--segment"
    files = gpt2_bpe_files(args)
    if files:
        tokenizer = load_gpt2_bpe(*files)
        if distributed_rank()[0] == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(str(path))
        say(f"--bpe_token: GPT-2's BPE files {files[0]} and {files[1]} ({tokenizer.get_vocab_size():,} tokens with "
            f"the 5 special tokens added) -> {path}")
        return path
    if not args.raw:
        if not path.is_file():
            raise UserError(f"{flag}: no vocabulary in {args.tokenized_data_path}; add --raw to build one")
        return path
    articles = [a for a in load_articles(args.raw_data_path) if len(a) >= args.min_length]
    # deterministic: every process builds the same; the first one writes it
    if args.bpe_token:
        if args.bpe_vocab_size < len(SPECIAL_TOKENS) + 1:
            raise UserError(f"--bpe_vocab_size {args.bpe_vocab_size}: must be larger than the special tokens")
        tokenizer = build_bpe(articles, args.bpe_vocab_size)
        save = lambda: tokenizer.save(str(path))  # noqa: E731
        what = f"a BPE of {tokenizer.get_vocab_size():,} tokens"
    else:
        tokens = build_word_vocab(articles, args.segment_min_count)
        save = lambda: write_vocab(tokens, path)  # noqa: E731
        what = f"a word vocabulary of {len(tokens):,} tokens ({sum(map(is_hanzi_word, tokens)):,} words)"
    if distributed_rank()[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        save()
    say(f"{flag}: built {what} from {args.raw_data_path} -> {path}")
    return path


def training_precision(args, device, say):
    """The autocast dtype of the run (None: fp32), said in one line."""
    dtype = autocast_dtype(device, args.precision, args.fp16)
    note = ""
    if args.fp16 and args.fp16_opt_level == "O0":
        dtype, note = None, " (--fp16_opt_level O0: apex's O0 is plain fp32)"
    elif args.fp16:
        note = (f" with a GradScaler (--fp16_opt_level {args.fp16_opt_level}: torch.amp's fp16 autocast, apex's O1; "
                f"weights stay fp32)")
    say(f"precision: {precision_name(dtype)}{note}")
    return dtype


def optimizer_step(model, batches, optimizer, scheduler, scaler, max_grad_norm, device):
    """One optimizer step over the micro-batches [(input_ids, labels)] of a gradient accumulation, clipped.
    Returns the step's mean loss, kept on the device (reading it would wait for the GPU)."""
    step_loss = torch.zeros((), device=device)
    for input_ids, labels in batches:
        loss = model(input_ids, labels).mean() / len(batches)  # DataParallel: one loss per GPU
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


class LogWindow:
    """Loss, steps and tokens since the last --log_step line, for the progress bar and metrics."""

    def __init__(self):
        self.loss, self.steps, self.tokens, self.start = 0.0, 0, 0, time.time()

    def add(self, step_loss, tokens):
        self.loss, self.steps, self.tokens = self.loss + step_loss, self.steps + 1, self.tokens + tokens

    def tokens_per_s(self):
        return self.tokens / max(time.time() - self.start, 1e-9)


def train(args):
    rank, local_rank, world = distributed_rank()
    main_process = rank == 0
    say = print if main_process else (lambda *a, **k: None)
    output_dir = Path(args.output_dir)

    config, tokenizer, config_name, vocab_name = model_and_vocabulary(args, say)
    n_ctx = context_length(config)
    validate(args, n_ctx, config_name)

    # ---- a previous run in output_dir: resume it, or replace it only when asked -------------------
    previous = checkpoints.previous_run(output_dir)
    resume_from = None
    if args.resume:
        resume_from = output_dir / checkpoints.CHECKPOINT if args.resume == "auto" else Path(args.resume)
        if not (resume_from / checkpoints.STATE_FILE).is_file():
            raise UserError(f"--resume: no resumable checkpoint in {resume_from}; run without --resume to start anew")
    elif previous and not args.overwrite:
        raise UserError(f"{output_dir} holds a previous run ({', '.join(previous)}); add --resume to continue it, "
                        f"--overwrite to delete it and start anew, or choose another --output_dir")

    # ---- devices and processes ------------------------------------------------------------------
    if world > 1:
        device = distributed_device(args.device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        say(f"device: {world} processes (DistributedDataParallel, {device.type})")
        gpu_ids = []
    else:
        device, gpu_ids = pick_device(args.device, say=say)
    dtype = training_precision(args, device, say)

    # ---- data -----------------------------------------------------------------------------------
    eval_ids, eval_chars = None, None
    if args.eval_data_path:
        eval_articles = [a for a in load_articles(args.eval_data_path) if len(a) >= args.min_length]
        if not eval_articles:
            raise UserError(f"--eval_data_path {args.eval_data_path}: no article of --min_length {args.min_length} "
                            f"characters or more")
        eval_ids = np.array([i for a in encode_articles(tokenizer, eval_articles) for i in a], dtype=np.int64)
        eval_chars = sum(map(len, eval_articles))
    if args.raw and main_process:
        say(f"tokenizing {args.raw_data_path} into {args.num_pieces} pieces in {args.tokenized_data_path}")
        manifest = build_pieces(args.raw_data_path, tokenizer, vocab_name, args.tokenized_data_path,
                                args.num_pieces, args.min_length)
        say(f"  {manifest['tokens']:,} tokens from {manifest['articles']} articles "
            f"({manifest['articles_skipped']} shorter than --min_length {args.min_length} skipped), "
            f"[UNK] {100 * manifest['unk_tokens'] / manifest['tokens']:.3f}%")
    if world > 1:
        torch.distributed.barrier()
    manifest = check_pieces(args.raw_data_path, tokenizer, vocab_name, args.tokenized_data_path, args.num_pieces,
                            args.min_length)
    pieces = load_pieces(args.tokenized_data_path, manifest)
    if args.eval_ratio:
        pieces, eval_ids = split_eval_tail(pieces, args.eval_ratio)
        # stand-in for the articles' characters: a character token is one, [SEP] a newline; BPE tokens decoded
        eval_chars = len(ids_to_text(tokenizer, eval_ids.tolist())) if is_bpe(tokenizer) else len(eval_ids)
    windows = make_windows(pieces, n_ctx, args.stride)
    corpus_tokens = sum(len(p) for p in pieces)
    if args.input_noise:
        unigram = sum(np.bincount(piece, minlength=len(tokenizer)) for piece in pieces)[:len(tokenizer)]
        unigram = unigram / unigram.sum()
    if corpus_tokens < n_ctx:
        say(f"note: the corpus has only {corpus_tokens} tokens, fewer than n_ctx {n_ctx}; training on what there is")

    # ---- model, optimizer, schedule -------------------------------------------------------------
    say("config:\n" + config.to_json_string())
    torch.manual_seed(args.seed)  # before the weights are drawn: a run is reproducible
    model = build_model(config, resume_from or args.pretrained_model or None, attn_dropout=not args.no_attn_dropout)
    checkpoints.record_vocabulary(model, tokenizer)
    say(f"number of parameters: {count_parameters(model)}")
    if args.no_attn_dropout and config.attn_pdrop:
        say(f"--no_attn_dropout: attention dropout {config.attn_pdrop} -> 0 (faster on CPU)")
    elif device.type == "cpu" and model.config.attn_pdrop > 0:
        choose_dropout_attention(model, args.batch_size, dtype, args.attention_kernel, say)
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, args, device)
    batches_per_epoch = math.ceil(windows_per_rank(len(windows), world) / args.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation)
    total_steps = steps_per_epoch * args.epochs
    scheduler = make_scheduler(optimizer, args, total_steps)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    settings = {name: getattr(args, name) for name in RUN_SETTINGS}
    average = WeightAverage(model) if args.average_from else None
    average_after = round(args.average_from * total_steps)  # the average takes the weights after later steps

    if main_process and previous and args.overwrite:  # only now that every input has been checked
        say(f"--overwrite: deleting the previous run in {output_dir} ({', '.join(previous)})")
        for name in previous:
            shutil.rmtree(output_dir / name)
        for name in ("metrics.jsonl", "loss_curve.png"):
            (output_dir / name).unlink(missing_ok=True)
    epoch, global_step, best_eval = 0, 0, math.inf
    metrics = MetricsLog(output_dir, args.writer_dir, say) if main_process else None
    if resume_from:
        state = checkpoints.load_checkpoint(resume_from)
        changed = [f"--{k} {settings[k]} (was {v})" for k, v in state["settings"].items() if settings.get(k) != v]
        if changed:
            raise UserError(f"--resume: {', '.join(changed)} differ from the run being resumed; use its flags, "
                            f"or --overwrite to start a new run")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        checkpoints.set_rng_states(state["rng"])
        if average is not None and state.get("average"):
            average.load_state_dict(state["average"])
        epoch, global_step = state["position"]["epoch"], state["position"]["global_step"]
        best_eval = state["position"].get("best_eval", math.inf)
        if metrics:
            metrics.truncate_after(global_step)
        say(f"resuming {resume_from}: epoch {epoch + 1}, step {global_step} of {total_steps}")
        if global_step >= total_steps:
            say(f"the run already finished; its final model is in {output_dir / 'final_model'}")
            return 0

    model = CausalLMLoss(model, dtype)  # runs in `dtype` in every thread and process that calls it
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    elif len(gpu_ids) > 1:
        model = torch.nn.DataParallel(model, device_ids=gpu_ids)
    if args.compile:
        model = torch.compile(model)

    say(f"{len(windows):,} windows of up to {n_ctx} tokens every {args.stride} ({corpus_tokens:,} tokens); "
        f"{steps_per_epoch} steps an epoch of batch {args.batch_size} x {args.gradient_accumulation} x {world}; "
        f"{total_steps} steps in all")

    def save(position, reason):
        if main_process:
            checkpoints.save_checkpoint(output_dir, model, tokenizer, optimizer, scheduler, scaler,
                                        position, settings, average)
            tqdm.write(f"saved a resumable checkpoint to {output_dir / checkpoints.CHECKPOINT} ({reason})")

    def run_eval(step, lm=None, name="eval"):
        total_nll, total_tokens = evaluate(lm or checkpoints.unwrap(model), eval_ids, n_ctx, max(1, n_ctx // 2),
                                           args.batch_size, device, dtype, progress=main_process)
        result = summarize(total_nll, total_tokens, eval_chars)
        if metrics:
            metrics.log(step, **{f"{name}_loss": result["loss"], f"{name}_loss_per_char": result["loss_per_char"]})
        return result

    def averaged_since():
        return f"the average of the weights after steps {average_after + 1}-{average_after + average.count}"

    def finish_epoch(epoch, global_step, best_eval):
        """Held-out loss, best_model/, model_epoch{N}/ and the checkpoint after `epoch` (counted from 1);
        returns the best held-out loss so far."""
        if eval_ids is not None:
            result = run_eval(global_step)
            say(f"epoch {epoch}: held-out loss {result['loss']:.4f} ({result['perplexity']:.1f} perplexity), "
                f"{result['loss_per_char']:.4f} nats per character")
            candidates = [(result["loss"], model)]
            if average is not None and average.count:
                averaged = run_eval(global_step, average.model, "eval_average")
                say(f"epoch {epoch}: held-out loss {averaged['loss']:.4f} ({averaged['loss_per_char']:.4f} nats per "
                    f"character) of {averaged_since()}")
                candidates.append((averaged["loss"], average.model))
            loss, best = min(candidates, key=lambda candidate: candidate[0])
            if args.keep_best and loss < best_eval and main_process:
                best_eval = loss
                checkpoints.save_model_folder(best, tokenizer, output_dir / "best_model")
                say(f"saved {output_dir / 'best_model'} (best held-out loss so far"
                    f"{', the averaged weights' if best is not model else ''})")
        if main_process:
            checkpoints.save_model_folder(model, tokenizer, output_dir / f"model_epoch{epoch}")
            say(f"saved {output_dir / f'model_epoch{epoch}'}")
            save({"epoch": epoch, "global_step": global_step, "best_eval": best_eval}, f"end of epoch {epoch}")
            metrics.plot()
        return best_eval

    def micro_batches(order, epoch, step_in_epoch):
        """The (input_ids, labels) of one optimizer step on the device, and the tokens they hold (all ranks)."""
        first = step_in_epoch * args.gradient_accumulation
        batches, tokens = [], 0
        for b in range(first, min(first + args.gradient_accumulation, batches_per_epoch)):
            input_ids, labels = make_batch(pieces, windows[order[b * args.batch_size:(b + 1) * args.batch_size]],
                                           tokenizer.pad_token_id)
            if args.input_noise:  # drawn from (seed, epoch, batch, rank): a resumed run draws the same
                noise_inputs(input_ids, labels, args.input_noise, unigram,
                             np.random.default_rng([args.seed, epoch, b, rank]))
            tokens += int((labels != -100).sum()) * world
            batches.append((to_device(torch.from_numpy(input_ids), device), to_device(torch.from_numpy(labels), device)))
        return batches, tokens

    stop = StopRequest()
    last_save = time.time()
    try:
        while epoch < args.epochs:
            order = epoch_order(len(windows), args.seed, epoch, rank, world)
            first_step = global_step - epoch * steps_per_epoch
            bar = progress_bar(total=steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{args.epochs}",
                               unit="step", disable=not main_process)
            window, last_postfix = LogWindow(), 0.0
            for step_in_epoch in range(first_step, steps_per_epoch):
                batches, tokens = micro_batches(order, epoch, step_in_epoch)
                try:
                    step_loss = optimizer_step(model, batches, optimizer, scheduler, scaler, args.max_grad_norm, device)
                except RuntimeError as error:
                    if is_out_of_memory(error):
                        raise UserError(f"out of memory on {device} with --batch_size {args.batch_size}; lower "
                                        f"--batch_size and raise --gradient_accumulation to keep the same "
                                        f"effective batch (e.g. --batch_size {max(1, args.batch_size // 2)} "
                                        f"--gradient_accumulation {args.gradient_accumulation * 2})") from None
                    raise
                global_step += 1
                if average is not None and global_step > average_after:
                    average.update(checkpoints.unwrap(model))
                window.add(step_loss, tokens)
                lr = scheduler.get_last_lr()[0]
                if time.time() - last_postfix >= 1:  # .item() waits for the GPU: once a second, not each step
                    bar.set_postfix(loss=f"{step_loss.item():.3f}", lr=f"{lr:.2e}", tok_s=f"{window.tokens_per_s():,.0f}",
                                    refresh=False)  # the bar redraws at its own pace (every 30 s into a log file)
                    last_postfix = time.time()
                bar.update()
                last_of_epoch = step_in_epoch == steps_per_epoch - 1
                if global_step % args.log_step == 0 or last_of_epoch:
                    mean_loss = window.loss.item() / window.steps
                    if metrics:
                        metrics.log(global_step, epoch=epoch + 1, train_loss=mean_loss, lr=lr,
                                    tokens_per_s=window.tokens_per_s())
                        tqdm.write(f"{time.strftime('%H:%M:%S')} epoch {epoch + 1} step {global_step}/{total_steps}: "
                                   f"loss {mean_loss:.4f}, lr {lr:.2e}, {window.tokens_per_s():,.0f} tokens/s")
                    window = LogWindow()
                if eval_ids is not None and args.eval_every and global_step % args.eval_every == 0:
                    result = run_eval(global_step)
                    tqdm.write(f"step {global_step}: held-out loss {result['loss']:.4f}")
                if last_of_epoch:
                    break  # the end of the epoch saves (and honours a stop request) below
                position = {"epoch": epoch, "global_step": global_step, "best_eval": best_eval}
                if stop.signal is not None:
                    save(position, signal.Signals(stop.signal).name)
                    say(f"stopped at step {global_step}; continue with the same command plus --resume")
                    return 130
                if (args.save_every and global_step % args.save_every == 0) or \
                        time.time() - last_save > args.save_minutes * 60:
                    save(position, f"step {global_step}")
                    last_save = time.time()
            bar.close()
            epoch += 1
            best_eval = finish_epoch(epoch, global_step, best_eval)
            last_save = time.time()
            if stop.signal is not None and epoch < args.epochs:
                say(f"stopped after epoch {epoch}; continue with the same command plus --resume")
                return 130
        if main_process:
            final = average.model if average is not None and average.count else model
            checkpoints.save_model_folder(final, tokenizer, output_dir / "final_model")
            plot = metrics.plot()
            say(f"saved {output_dir / 'final_model'}" + (f" ({averaged_since()}; model_epoch{epoch} holds the last "
                                                          f"weights)" if final is not model else "")
                + (f"; loss curve in {plot}" if plot else " (install matplotlib for a loss-curve PNG)"))
    finally:
        stop.restore()
        if metrics:
            metrics.close()
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0
