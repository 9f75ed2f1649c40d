"""Continue a prefix with a trained model (the GPT2-Chinese generate.py, with its flags)."""
import argparse
import random
import time
from pathlib import Path

from gpt2zh.errors import UserError, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # The original's flags.
    p.add_argument("--device", default="0,1,2,3",
                   help="GPU ids (the first existing one is used), mps (a Mac's GPU) or cpu; with none of the GPUs "
                        "named: a Mac's GPU where there is one, else the CPU")
    p.add_argument("--length", type=int, default=-1, help="tokens to generate; -1: the model's n_ctx")
    p.add_argument("--batch_size", type=int, default=None,
                   help="samples drawn at once (default: all --nsamples in one batch)")
    p.add_argument("--nsamples", type=int, default=10, help="how many samples")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--topk", type=int, default=8, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--topp", type=float, default=0.0, help="nucleus sampling threshold in (0, 1] (0 or 1: off)")
    p.add_argument("--model_config", default="config/model_config_small.json",
                   help="unused, as in the original: the config is read from --model_path")
    p.add_argument("--tokenizer_path", default=None,
                   help="vocabulary; default: the one saved with the model (a folder of the original GPT2-Chinese has "
                        "none: give the vocab file it was trained with)")
    p.add_argument("--model_path", default="model/final_model",
                   help="a model folder: written by train.py, by the original GPT2-Chinese, or a GPT-2 in the Hugging "
                        "Face layout")
    p.add_argument("--prefix", default="萧炎", help="the text to continue ([CLS] starts a new article)")
    p.add_argument("--no_wordpiece", action="store_true", help="tokenize the prefix character by character")
    p.add_argument("--segment", action="store_true",
                   help="the model was trained on words (train.py --segment); taken from its vocabulary anyway, and "
                        "refused for a character model")
    p.add_argument("--fast_pattern", action="store_true", help="accepted for compatibility: the KV cache is always on")
    p.add_argument("--save_samples", action="store_true", help="also write the samples to a file")
    p.add_argument("--save_samples_path", default=".", help="folder for samples.txt")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="CTRL's penalty on tokens already present")
    # Additions.
    p.add_argument("--repetition_window", type=int, default=0,
                   help="--repetition_penalty counts only the last N tokens (0: all of them, as in the original); "
                        "the CPU preset samples with 32 and a penalty of 1.5")
    p.add_argument("--seed", type=int, default=None, help="random seed (printed when not given)")
    p.add_argument("--sampling_kernel", default="auto",
                   help="how a sampling step runs on CPU (bf16-cpp: the whole step in C++, built once per machine; "
                        "or PyTorch's with an fp32 cache and plain, fp16 or packed linear layers): auto measures the "
                        "candidates once on this machine and remembers the fastest; a name forces one")
    p.add_argument("--interactive", action="store_true",
                   help="load the model once, then continue each beginning typed at the prompt (an empty line or "
                        "Ctrl-D ends); --prefix is not used")
    p.add_argument("--stop_at_end", action="store_true",
                   help="end a sample at the end of an article ([CLS]) instead of after --length tokens: ask for "
                        "'one chapter' (--length is then the most it writes)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 weights where the hardware has fast bf16")
    return p.parse_args(argv)


def validate(args):
    checks = [(args.length == 0 or args.length < -1, f"--length {args.length}: must be positive (or -1 for n_ctx)"),
              (args.nsamples < 1, f"--nsamples {args.nsamples}: must be at least 1"),
              (args.batch_size is not None and args.batch_size < 1,
               f"--batch_size {args.batch_size}: must be at least 1"),
              (args.temperature <= 0, f"--temperature {args.temperature}: must be greater than 0"),
              (args.topk < 0, f"--topk {args.topk}: must be 0 (off) or more"),
              (not 0 <= args.topp <= 1, f"--topp {args.topp}: must be in (0, 1] (or 0 for off)"),
              (args.repetition_penalty <= 0, f"--repetition_penalty {args.repetition_penalty}: must be positive"),
              (args.repetition_window < 0,
               f"--repetition_window {args.repetition_window}: must be 0 (all tokens) or more")]
    for failed, message in checks:
        if failed:
            raise UserError(message)


def sample_header(number):
    return "=" * 40 + " SAMPLE " + str(number) + " " + "=" * 40 + "\n"


def read_prefixes(interactive, prefix):
    """--prefix, or with --interactive each line typed until an empty one or the end of input."""
    if not interactive:
        yield prefix
        return
    print("type a beginning and press Enter (an empty line or Ctrl-D ends) / 输入开头，回车续写（空行或 Ctrl-D 结束）")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line.strip():
            return
        yield line


class PrintAsSampled:
    """on_step for one row in flight: its text printed as each token is sampled."""

    def __init__(self, stream):
        self.stream = stream

    def __call__(self, ids):
        print(self.stream.push(int(ids[0])), end="", flush=True)


class Tally:
    """Samples written so far and their sampled tokens, across prefixes."""

    def __init__(self):
        self.samples, self.tokens, self.start = 0, 0, time.time()


def open_samples_file(args):
    """mnt/samples.txt (or --save_samples_path's) with --save_samples, else None; a previous one is replaced, said."""
    if not args.save_samples:
        return None
    path = Path(args.save_samples_path) / "samples.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        print(f"replacing the previous {path}")
    return open(path, "w", encoding="utf-8")


def write_batch(writer, prefix_ids, rows, length, processors, seed, args):
    """`rows` samples of `length` tokens: one row streams its text as it is sampled; several show a progress bar."""
    from gpt2zh.articles import TextStream
    from gpt2zh.console import progress_bar

    if rows == 1:
        stream = TextStream(writer.tokenizer, prefix_ids)
        print(stream.text, end="", flush=True)
        out = writer.write(prefix_ids, length, 1, processors, seed, args.stop_at_end, PrintAsSampled(stream))
        print()
        return out
    with progress_bar(total=rows * length, unit="tok", desc=f"sampling {rows}", leave=False) as bar:
        return writer.write(prefix_ids, length, rows, processors, seed, args.stop_at_end,
                            lambda ids: bar.update(len(ids)))


def continue_prefix(writer, prefix, length, processors, seed, args, tally, samples_file):
    """--nsamples continuations of `prefix`, --batch_size at a time, printed and saved."""
    from gpt2zh.articles import encode_prefix, ids_to_text, missing_characters

    tokenizer = writer.tokenizer
    prefix_ids = encode_prefix(tokenizer, prefix, args.no_wordpiece)
    missing = missing_characters(tokenizer, prefix)
    if missing:
        print(f"warning: these characters of the prefix are not in the vocabulary and become [UNK]: {''.join(missing)}")
    if not prefix_ids:
        raise UserError("--prefix is empty; give some text to continue, e.g. --prefix \"[CLS]悟空大喝一声\"")
    batch_size, done = args.batch_size or args.nsamples, 0
    while done < args.nsamples:
        rows = min(batch_size, args.nsamples - done)
        writer.decode_step(rows)  # a kernel trial for this many rows says its line before the text starts
        if rows == 1:
            print(sample_header(tally.samples + 1))
        out = write_batch(writer, prefix_ids, rows, length, processors, seed + tally.samples, args)
        for row in out:
            tally.samples, done = tally.samples + 1, done + 1
            tally.tokens += len(row) - len(prefix_ids)
            header, text = sample_header(tally.samples), ids_to_text(tokenizer, row)
            if rows > 1:
                print(header)
                print(text)
            if samples_file:
                samples_file.write(header + text + "\n" + "=" * 90 + "\n\n")
                samples_file.flush()


def main():
    args = parse_args()
    validate(args)
    if args.sampling_kernel == "auto" or args.sampling_kernel.endswith("-cpp"):  # before torch finds a GPU: kept anyway
        from gpt2zh.native_build import start_building

        start_building()  # the C++ step's compiler on one core while torch is imported on the other
    from gpt2zh.devices import pick_device
    from gpt2zh.sampling import Writer
    from gpt2zh.vocab import check_segment_flag

    device, _ = pick_device(args.device)
    writer = Writer(args.model_path, args.tokenizer_path, device, args.precision, args.batch_size or args.nsamples,
                    args.sampling_kernel)
    check_segment_flag(writer.tokenizer, args.segment, args.model_path)
    length = writer.n_ctx if args.length == -1 else args.length
    processors = writer.processors(args.temperature, args.topk, args.topp, args.repetition_penalty,
                                   repetition_window=args.repetition_window)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"seed: {seed}")
    samples_file, tally = open_samples_file(args), Tally()
    for prefix in read_prefixes(args.interactive, args.prefix):
        continue_prefix(writer, prefix, length, processors, seed, args, tally, samples_file)
    print("=" * 80)
    elapsed = time.time() - tally.start
    shape = f"{tally.samples} samples x {length} tokens" if not args.stop_at_end else \
        f"{tally.samples} samples ({tally.tokens:,} tokens, each ending at the end of an article or after {length})"
    print(f"{shape} in {elapsed:.1f} s ({tally.tokens / max(elapsed, 1e-9):,.0f} tokens/s)")
    if samples_file:
        samples_file.close()
        print(f"saved to {samples_file.name}")


if __name__ == "__main__":
    run_cli(main)
