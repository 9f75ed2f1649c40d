"""Continue a prefix with a trained model (the GPT2-Chinese generate.py, with its flags)."""
import argparse
import random
import time
from pathlib import Path

from gpt2zh.errors import UserError, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # The original's flags.
    p.add_argument("--device", default="0,1,2,3", help="GPU ids (the first existing one is used); CPU without GPUs")
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
    p.add_argument("--fast_pattern", action="store_true", help="accepted for compatibility: the KV cache is always on")
    p.add_argument("--save_samples", action="store_true", help="also write the samples to a file")
    p.add_argument("--save_samples_path", default=".", help="folder for samples.txt")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="CTRL's penalty on tokens already present")
    # Additions.
    p.add_argument("--seed", type=int, default=None, help="random seed (printed when not given)")
    p.add_argument("--stop_at_end", action="store_true",
                   help="end a sample at the end of an article ([CLS]) instead of after --length tokens: ask for "
                        "'one chapter' (--length is then the most it writes)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 weights where the hardware has fast bf16")
    return p.parse_args(argv)


def validate(args):
    checks = [(args.length == 0 or args.length < -1, f"--length {args.length}: must be positive (or -1 for n_ctx)"),
              (args.nsamples < 1, f"--nsamples {args.nsamples}: must be at least 1"),
              (args.batch_size is not None and args.batch_size < 1, f"--batch_size {args.batch_size}: must be at least 1"),
              (args.temperature <= 0, f"--temperature {args.temperature}: must be greater than 0"),
              (args.topk < 0, f"--topk {args.topk}: must be 0 (off) or more"),
              (not 0 <= args.topp <= 1, f"--topp {args.topp}: must be in (0, 1] (or 0 for off)"),
              (args.repetition_penalty <= 0, f"--repetition_penalty {args.repetition_penalty}: must be positive")]
    for failed, message in checks:
        if failed:
            raise UserError(message)


def main():
    args = parse_args()
    validate(args)
    import torch

    from gpt2zh.articles import ARTICLE_END, encode_prefix, ids_to_text, missing_characters
    from gpt2zh.checkpoints import load_model_folder
    from gpt2zh.console import progress_bar
    from gpt2zh.devices import autocast_dtype, pick_device
    from gpt2zh.model import context_length, quiet_transformers
    from gpt2zh.sampling import cut_at_stop, make_logits_processors, pack_for_cpu_sampling, sample

    quiet_transformers()
    device, _ = pick_device(args.device)
    model, tokenizer = load_model_folder(args.model_path, args.tokenizer_path)
    model.to(device, dtype=autocast_dtype(device, args.precision, fp16=False) or torch.float32).eval()
    batch_size = args.batch_size or args.nsamples
    pack_for_cpu_sampling(model, batch_size)
    n_ctx = context_length(model.config)
    length = n_ctx if args.length == -1 else args.length

    prefix_ids = encode_prefix(tokenizer, args.prefix, args.no_wordpiece)
    missing = missing_characters(tokenizer, args.prefix)
    if missing:
        print(f"warning: these characters of --prefix are not in the vocabulary and become [UNK]: {''.join(missing)}")
    if not prefix_ids:
        raise UserError("--prefix is empty; give some text to continue, e.g. --prefix \"[CLS]悟空大喝一声\"")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"seed: {seed}")
    generator = torch.Generator(device=device).manual_seed(seed)
    # [UNK], [PAD], and the rows a config's vocab_size reserves beyond the vocabulary, which name no token
    suppress = [tokenizer.unk_token_id, tokenizer.pad_token_id, *range(len(tokenizer), model.config.vocab_size)]
    processors = make_logits_processors(args.temperature, args.topk, args.topp, args.repetition_penalty, suppress)

    samples_file = None
    if args.save_samples:
        samples_path = Path(args.save_samples_path) / "samples.txt"
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        if samples_path.exists():
            print(f"replacing the previous {samples_path}")
        samples_file = open(samples_path, "w", encoding="utf-8")
    stop_id = tokenizer.convert_tokens_to_ids(ARTICLE_END) if args.stop_at_end else None
    generated, sampled_tokens, start = 0, 0, time.time()
    while generated < args.nsamples:
        rows = min(batch_size, args.nsamples - generated)
        with progress_bar(total=rows * length, unit="tok", desc=f"sampling {rows}", leave=False) as bar:
            out = sample(model, prefix_ids, length, rows, processors, n_ctx, generator=generator,
                         on_step=lambda: bar.update(rows), stop_id=stop_id)
        for row in out.tolist():
            if stop_id is not None:
                row = cut_at_stop(row, len(prefix_ids), stop_id)
            generated += 1
            sampled_tokens += len(row) - len(prefix_ids)
            info = "=" * 40 + " SAMPLE " + str(generated) + " " + "=" * 40 + "\n"
            text = ids_to_text(tokenizer, row)
            print(info)
            print(text)
            if samples_file:
                samples_file.write(info + text + "\n" + "=" * 90 + "\n\n")
    print("=" * 80)
    elapsed = time.time() - start
    shape = f"{generated} samples x {length} tokens" if stop_id is None else \
        f"{generated} samples ({sampled_tokens:,} tokens, each ending at the end of an article or after {length})"
    print(f"{shape} in {elapsed:.1f} s ({sampled_tokens / elapsed:,.0f} tokens/s)")
    if samples_file:
        samples_file.close()
        print(f"saved to {samples_path}")


if __name__ == "__main__":
    run_cli(main)
