"""The whole pipeline on the CPU in a few minutes: a small model trained on a short text, then 3 samples in mnt/.
Its files go to data/quickstart/ and model/quickstart/ (your own data/ and model/ files are left alone)."""
import argparse

from gpt2zh.errors import run_cli

WORK, OUTPUT = "data/quickstart", "model/quickstart"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("novel", nargs="?", default=None,
                   help="a novel (.txt); default: examples/sample_novel.txt, written for this project")
    args = p.parse_args()
    from gpt2zh.preset import SAMPLE_NOVEL, run_script

    run_script("txt_to_json.py", [args.novel or SAMPLE_NOVEL, "--output", f"{WORK}/input.json"])
    run_script("clr_ctrl.py", ["--input", f"{WORK}/input.json", "--output", f"{WORK}/train.json"])
    run_script("train.py", ["--model_config", "config/model_config_quick.json", "--raw_data_path", f"{WORK}/train.json",
                            "--tokenized_data_path", f"{WORK}/tokenized/", "--raw", "--num_pieces", 1,
                            "--min_length", 64, "--stride", 8, "--epochs", 5, "--batch_size", 8, "--lr", "1e-3",
                            "--warmup_steps", 20, "--log_step", 50, "--device", "cpu", "--output_dir", f"{OUTPUT}/",
                            "--writer_dir", f"{OUTPUT}/tensorboard/", "--overwrite"])
    run_script("generate.py", ["--model_path", f"{OUTPUT}/final_model", "--device", "cpu", "--length", 120,
                               "--nsamples", 3, "--prefix", "[CLS]阿福", "--save_samples", "--save_samples_path",
                               "./mnt/", "--seed", 0])
    print(f"quickstart done: samples in mnt/samples.txt, model in {OUTPUT}/final_model")


if __name__ == "__main__":
    run_cli(main)
