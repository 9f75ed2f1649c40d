"""Train a GPT-2 from zero on data/train.json (the GPT2-Chinese train.py, with its flags)."""
import argparse
import sys
import time

from gpt2zh.errors import run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_original_flags(parser)
    add_new_flags(parser)
    return parser.parse_args(argv)


def add_original_flags(p):
    """The original's flags: same names, defaults and meaning."""
    p.add_argument("--device", default="0,1,2,3", help="GPU ids to use, e.g. 0,1; ids that do not exist are "
                   "skipped; with no GPU a Mac's GPU (mps) where there is one, else the CPU (or say mps or cpu)")
    p.add_argument("--model_config", default="config/model_config_small.json", help="model settings (JSON)")
    p.add_argument("--tokenizer_path", default=None,
                   help="vocabulary, one token a line (or a folder with one); default: cache/vocab_small.txt, or with "
                        "--pretrained_model the vocabulary saved in that folder")
    p.add_argument("--raw_data_path", default="data/train.json", help="the cleaned corpus (clr_ctrl.py's output)")
    p.add_argument("--tokenized_data_path", default="data/tokenized/", help="where the tokenized pieces live")
    p.add_argument("--raw", action="store_true", help="tokenize --raw_data_path into pieces first")
    p.add_argument("--epochs", type=int, default=5, help="passes over the corpus")
    p.add_argument("--batch_size", type=int, default=8,
                   help="windows per batch; DataParallel (--device 0,1) splits it across the GPUs, as the original "
                        "did; under torchrun each process takes this many")
    p.add_argument("--lr", type=float, default=1.5e-4, help="peak learning rate")
    p.add_argument("--warmup_steps", type=int, default=2000, help="optimizer steps of linear warm-up")
    p.add_argument("--log_step", type=int, default=1, help="print the mean loss every this many optimizer steps")
    p.add_argument("--stride", type=int, default=768, help="tokens between the starts of training windows")
    p.add_argument("--gradient_accumulation", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--fp16", action="store_true", help="fp16 autocast with a grad scaler (CUDA only)")
    p.add_argument("--fp16_opt_level", default="O1", choices=["O0", "O1", "O2", "O3"],
                   help="apex's optimisation level, accepted for compatibility: with --fp16, O0 trains in fp32 and "
                        "O1-O3 use torch.amp's fp16 autocast with fp32 weights (apex's O1)")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--num_pieces", type=int, default=100, help="how many pieces the tokenized corpus is cut into")
    p.add_argument("--min_length", type=int, default=128, help="skip articles shorter than this many characters")
    p.add_argument("--output_dir", default="model/", help="where model_epoch{N}/, final_model/ and checkpoint/ go")
    p.add_argument("--pretrained_model", default="",
                   help="start from this model folder instead of from zero (ours, the original GPT2-Chinese's or a "
                        "Hugging Face GPT-2): its config and vocabulary are used")
    p.add_argument("--writer_dir", default="tensorboard_summary/", help="TensorBoard log folder")
    p.add_argument("--bpe_token", action="store_true",
                   help="BPE tokens instead of characters: with --raw a BPE of --bpe_vocab_size tokens is trained on "
                        "--raw_data_path and saved as bpe_tokenizer.json in --tokenized_data_path (or give one made by "
                        "`cache/make_vocab.py --bpe` with --tokenizer_path)")
    p.add_argument("--segment", action="store_true",
                   help="words instead of characters: with --raw a word vocabulary (every character of the corpus, "
                        "plus the words rjieba finds at least --segment_min_count times) is built from "
                        "--raw_data_path and saved as segment_vocab.txt in --tokenized_data_path")
    p.add_argument("--encoder_json", default="tokenizations/encoder.json",
                   help="with --bpe_token: GPT-2's encoder.json (byte-level BPE tokens), read with --vocab_bpe where "
                        "given or present; without either file a BPE is trained on the corpus")
    p.add_argument("--vocab_bpe", default="tokenizations/vocab.bpe",
                   help="with --bpe_token: GPT-2's vocab.bpe (merges)")


def add_new_flags(p):
    p.add_argument("--segment_min_count", type=int, default=5, help="with --segment: how often a word must occur")
    p.add_argument("--bpe_vocab_size", type=int, default=8000, help="with --bpe_token: tokens of the BPE trained")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast where the hardware has fast bf16 (CUDA, CPUs with AVX512-BF16/AMX)")
    p.add_argument("--no_attn_dropout", action="store_true",
                   help="set attention dropout to 0: about 6%% faster on CPU (docs/BENCHMARKS.md, with its cost in "
                        "loss)")
    p.add_argument("--attention_kernel", default="auto",
                   help="CPU attention with dropout: auto (the fastest query block on this machine, measured once and "
                        "remembered) or blocked-64, blocked-128, blocked-256")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on GPUs)")
    p.add_argument("--lr_schedule", choices=["linear", "cosine", "wsd"], default="linear",
                   help="decay after warm-up; wsd: the peak held, then a linear decay over the last fifth")
    p.add_argument("--max_steps", type=int, default=0,
                   help="train this many optimizer steps instead of --epochs epochs (the last epoch may end part-way)")
    p.add_argument("--time_budget", type=float, default=0,
                   help="minutes the whole run may take, held-out evaluations and saves included: the speed of the "
                        "first steps fixes the number of steps (at most --epochs epochs; printed, and kept in the "
                        "checkpoint so that --resume continues the same run; with --lr_schedule wsd fixed again at "
                        "each epoch's end while the learning rate is at its peak)")
    p.add_argument("--weight_decay", type=float, default=0.0,
                   help="decoupled weight decay of the weight matrices (AdamW's, and Muon's with --optimizer muon)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: Muon for the transformer blocks' weight matrices, AdamW for the rest")
    p.add_argument("--muon_lr", type=float, default=0.0,
                   help="with --optimizer muon: Muon's peak learning rate (0: --lr; its updates are scaled to the size "
                        "of AdamW's, so the same rate is a fair start)")
    p.add_argument("--seed", type=int, default=42, help="seed of the weights, the shuffling and dropout")
    p.add_argument("--eval_data_path", default="", help="held-out articles (JSON list) to report loss on")
    p.add_argument("--eval_ratio", type=float, default=0.0, help="or hold out this last fraction of the corpus")
    p.add_argument("--eval_every", type=int, default=0, help="also evaluate every this many steps (0: each epoch)")
    p.add_argument("--average_from", type=float, default=0.0,
                   help="average the weights after every step from this fraction of the run on (e.g. 0.4; 0: off): "
                        "final_model/ holds the average, model_epoch{N}/ the weights of that moment; the average's "
                        "held-out loss is reported too")
    p.add_argument("--input_noise", type=float, default=0.0,
                   help="data noising: replace this fraction of the input tokens (not the targets) by tokens drawn "
                        "from the corpus's unigram distribution, anew every step (e.g. 0.1; 0: off)")
    p.add_argument("--shift_windows", action="store_true",
                   help="move each training window's start on by a random 0 to --stride - 1 tokens, drawn anew every "
                        "epoch: over many epochs of a small novel the model does not see the same windows each time")
    p.add_argument("--keep_best", action="store_true", help="save the best held-out model to best_model/")
    p.add_argument("--save_every", type=int, default=1000, help="save a resumable checkpoint every this many steps")
    p.add_argument("--save_minutes", type=float, default=10, help="... and at least this often (minutes)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue the run in --output_dir (or from the checkpoint folder given)")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in --output_dir and start anew")


def main():
    started = time.time()
    args = parse_args()
    from gpt2zh.training import train

    sys.exit(train(args, started))


if __name__ == "__main__":
    run_cli(main)
