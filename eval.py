"""Held-out loss and perplexity of a trained model on a corpus (the GPT2-Chinese eval.py, with its flags)."""
import argparse
from pathlib import Path

from gpt2zh.errors import UserError, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="0,1,2,3",
                   help="GPU ids (the first existing one is used), mps (a Mac's GPU) or cpu; with none of the GPUs "
                        "named: a Mac's GPU where there is one, else the CPU")
    p.add_argument("--model_config", default="config/model_config_small.json",
                   help="unused: the config is read from --pretrained_model")
    p.add_argument("--tokenizer_path", default=None,
                   help="vocabulary; default: the tokenizer saved with the model")
    p.add_argument("--raw_data_path", default="data/eval.json", help="the held-out articles (a JSON list)")
    p.add_argument("--tokenized_data_path", default="data/tokenized_eval/", help="where its tokenized pieces live")
    p.add_argument("--raw", action="store_true", help="tokenize --raw_data_path first")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--log_step", type=int, default=1, help="print the running loss every this many batches")
    p.add_argument("--stride", type=int, default=768,
                   help="tokens between windows; each token is scored once, with up to n_ctx tokens of context (and "
                        "at least one). Values above n_ctx become n_ctx // 2 (what train.py's held-out loss uses)")
    p.add_argument("--num_pieces", type=int, default=100, help="pieces of the tokenized corpus")
    p.add_argument("--min_length", type=int, default=128, help="skip articles shorter than this")
    p.add_argument("--pretrained_model", default="model/final_model", help="the model folder to evaluate")
    p.add_argument("--segment", action="store_true",
                   help="the model was trained on words (train.py --segment); taken from its vocabulary anyway, and "
                        "refused for a character model")
    p.add_argument("--output_dir", default="eval_result/", help="where result.json is written")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 where the hardware has it, as train.py's held-out loss; fp32 for numbers "
                        "that do not depend on the hardware")
    return p.parse_args(argv)


def main():
    args = parse_args()
    for flag in ("batch_size", "log_step"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    import numpy as np

    from gpt2zh.checkpoints import load_model_folder
    from gpt2zh.devices import autocast_dtype, pick_device
    from gpt2zh.evaluation import evaluate, summarize
    from gpt2zh.fileio import write_json_atomic
    from gpt2zh.model import context_length
    from gpt2zh.pieces import build_pieces, check_pieces, load_pieces
    from gpt2zh.vocab import check_segment_flag, vocab_hash

    device, _ = pick_device(args.device)
    model, tokenizer = load_model_folder(args.pretrained_model, args.tokenizer_path, "--pretrained_model")
    check_segment_flag(tokenizer, args.segment, args.pretrained_model)
    model.to(device)
    n_ctx = context_length(model.config)
    stride = args.stride
    if stride < 1:
        raise UserError(f"--stride {stride}: must be at least 1")
    if stride > n_ctx:
        stride = n_ctx // 2
        print(f"--stride {args.stride} exceeds the model's n_ctx {n_ctx}; using {stride}")

    # The pieces record the vocabulary they were made with: those of another model's are refused.
    vocab_name = f"the vocabulary of {args.pretrained_model}"
    if args.raw:
        manifest = build_pieces(args.raw_data_path, tokenizer, vocab_name, args.tokenized_data_path,
                                args.num_pieces, args.min_length)
    else:
        manifest = check_pieces(args.raw_data_path, tokenizer, vocab_name, args.tokenized_data_path,
                                args.num_pieces, args.min_length)
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in load_pieces(args.tokenized_data_path, manifest)])
    dtype = autocast_dtype(device, args.precision, fp16=False)
    print(f"evaluating {args.pretrained_model} on {args.raw_data_path}: {len(ids):,} tokens, "
          f"windows of {n_ctx} every {stride}")
    total_nll, total_tokens = evaluate(model, ids, n_ctx, stride, args.batch_size, device, dtype,
                                       pad_id=tokenizer.pad_token_id, log_step=args.log_step)
    result = {"model": str(args.pretrained_model), "data": str(args.raw_data_path), "stride": stride,
              "vocab_sha256": vocab_hash(tokenizer),
              **summarize(total_nll, total_tokens, manifest["characters"])}
    print(f"loss {result['loss']:.4f} nats/token (perplexity {result['perplexity']:.2f}), "
          f"{result['loss_per_char']:.4f} nats/character (perplexity {result['perplexity_per_char']:.2f}) "
          f"over {total_tokens:,} tokens")
    out = Path(args.output_dir) / "result.json"
    write_json_atomic(out, result)
    print(f"saved {out}")


if __name__ == "__main__":
    run_cli(main)
