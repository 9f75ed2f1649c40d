"""The CPU preset: a GPT-2 trained on a novel in --minutes (30) on any CPU of 2 or more cores, start to scored
samples — its size chosen from this machine's measured speed — then its held-out loss on the last chapters and 10
samples of 1000 characters, scored. Run the same command again to continue an interrupted run: finished stages are
skipped and training goes on from its checkpoint. Files: data/cpu_preset/, model/cpu_preset/, mnt/cpu_preset/."""
import argparse
import time
from pathlib import Path

from gpt2zh.errors import UserError, run_cli

WORK, OUTPUT, SAMPLES = "data/cpu_preset", "model/cpu_preset", "mnt/cpu_preset"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("novel", nargs="?", default=None,
                   help="the novel (.txt); default: the novels in data/, else the project's small sample")
    p.add_argument("--minutes", type=float, default=30, help="the whole preset's time, from start to scored samples")
    p.add_argument("--seed", type=int, default=1, help="seed of the weights, the shuffling, dropout and the samples")
    p.add_argument("--recipe", default="auto",
                   help="auto: the table's choice for this machine's speed (gpt2zh/preset.py RECIPES); or a row's "
                        "name, e.g. '4 x 320'")
    return p.parse_args(argv)


def prepare(novels, held_out, work):
    from gpt2zh.preset import run_script

    run_script("txt_to_json.py", [*novels, "--eval_articles", held_out, "--output", f"{work}/input.json",
                "--eval_output", f"{work}/eval_input.json"])
    run_script("clr_ctrl.py", ["--input", f"{work}/input.json", "--output", f"{work}/train.json"])
    run_script("clr_ctrl.py", ["--input", f"{work}/eval_input.json", "--output", f"{work}/eval.json"])
    run_script("cache/make_vocab.py", ["--from_json", f"{work}/train.json", "--output", f"{work}/vocab.txt"])


def pick_recipe(args, state, deadline, processes, threads):
    """The recipe: the one a resumed run chose, --recipe's, or the table's for this machine's measured speed."""
    from gpt2zh.preset import RECIPES, REFERENCE_CONFIG, choose_recipe, tokens_per_second
    from gpt2zh.run_clock import duration

    recipes = {recipe.name: recipe for _, recipe in RECIPES}
    if state.recipe in recipes:
        return recipes[state.recipe]
    if state.recipe:
        raise UserError(f"{OUTPUT}/preset.json: this run was started with the recipe '{state.recipe}', which this "
                        f"version of the preset no longer has; finish it with the version that started it, or delete "
                        f"{OUTPUT}/ to start anew")
    if args.recipe != "auto":
        if args.recipe not in recipes:
            raise UserError(f"--recipe {args.recipe}: not one of: auto, {', '.join(recipes)}")
        return recipes[args.recipe]
    speed = tokens_per_second(Path("config") / REFERENCE_CONFIG, processes, threads, 8 // processes)
    train_seconds = deadline - time.time()
    recipe, tokens = choose_recipe(train_seconds, speed)
    print(f"this machine trains the reference model at about {speed:,.0f} tokens/s: {tokens / 1e6:.1f}M tokens in "
          f"{duration(train_seconds)} -> {recipe.name} ({recipe.config})")
    return recipe


def train(args, recipe, budget, processes, threads, resume):
    from gpt2zh.preset import run_script

    run_script("train.py", ["--model_config", f"config/{recipe.config}", "--tokenizer_path",
                f"{WORK}/vocab.txt", "--raw_data_path", f"{WORK}/train.json", "--tokenized_data_path",
                f"{WORK}/tokenized/", "--raw", "--num_pieces", 1, "--stride", 256, "--batch_size", 8 // processes,
                "--epochs", recipe.epochs, "--time_budget", budget, "--lr", "1e-3", "--warmup_steps", 100,
                "--weight_decay", 0.1, "--log_step", 50, "--seed", args.seed,
                "--device", "cpu", "--eval_data_path", f"{WORK}/eval.json", "--output_dir", f"{OUTPUT}/",
                "--writer_dir", f"{OUTPUT}/tensorboard/", *recipe.flags, "--resume" if resume else "--overwrite"],
               processes, threads)


def evaluate_and_write(args):
    from gpt2zh.preset import SAMPLE_FLAGS, run_script

    run_script("eval.py", ["--pretrained_model", f"{OUTPUT}/final_model", "--raw_data_path", f"{WORK}/eval.json",
                "--tokenized_data_path", f"{WORK}/tokenized_eval/", "--raw", "--num_pieces", 1, "--stride", 128,
                "--log_step", 20, "--device", "cpu", "--output_dir", f"{OUTPUT}/"])
    run_script("generate.py", ["--model_path", f"{OUTPUT}/final_model", "--device", "cpu", *SAMPLE_FLAGS,
                "--seed", args.seed, "--save_samples", "--save_samples_path", f"{SAMPLES}/"])
    run_script("score_samples.py", [f"{SAMPLES}/samples.txt", "--json", f"{OUTPUT}/sample_scores.json"])


def main():
    started = time.time()
    args = parse_args()
    if args.minutes <= 0:
        raise UserError(f"--minutes {args.minutes}: must be positive")
    from gpt2zh import preset
    from gpt2zh.run_clock import duration

    novels = preset.novel_files(args.novel, print)
    state_path = Path(OUTPUT) / "preset.json"
    fresh = preset.PresetState(preset.fingerprint(novels), args.seed, args.minutes, started=started)
    state = preset.PresetState.load(state_path)
    if state is None or (state.novel_sha256, state.seed, state.minutes) != (fresh.novel_sha256, fresh.seed,
                                                                            fresh.minutes):
        state = fresh
    elif "samples" in state.done:
        print(f"the preset with this novel and seed is done (results in {OUTPUT}/ and {SAMPLES}/); another --seed "
              f"runs it again")
        return
    elif state.done:
        print(f"continuing the preset started {time.ctime(state.started)}: done {', '.join(state.done)}")
    available = preset.cores()
    processes, threads = preset.training_processes(available)
    print(f"{available} core{'s' * (available > 1)}: training in {processes} process(es) of {threads} thread(s)")
    deadline = state.started + args.minutes * 60 - min(preset.AFTER_TRAINING, args.minutes * 15)
    if "data" not in state.done:
        prepare(novels, preset.held_out_articles(novels), WORK)
        state.done += ("data",)
        state.save(state_path)
    if "trained" not in state.done:
        resume = "training" in state.done and (Path(OUTPUT) / "checkpoint").is_dir()
        if not resume:
            recipe = pick_recipe(args, state, deadline, processes, threads)
            launching = 10  # seconds before train.py's clock starts (torchrun, imports)
            state.recipe, state.budget = recipe.name, round((deadline - time.time() - launching) / 60, 2)
            state.done = tuple(stage for stage in state.done if stage != "training") + ("training",)
            state.save(state_path)
        train(args, pick_recipe(args, state, deadline, processes, threads), state.budget, processes, threads, resume)
        state.done += ("trained",)
        state.save(state_path)
    evaluate_and_write(args)
    state.done += ("samples",)
    state.save(state_path)
    print(f"preset done in {duration(time.time() - started)} (this command): model {OUTPUT}/final_model, held-out "
          f"loss {OUTPUT}/result.json, samples {SAMPLES}/samples.txt, their scores {OUTPUT}/sample_scores.json")


if __name__ == "__main__":
    run_cli(main)
