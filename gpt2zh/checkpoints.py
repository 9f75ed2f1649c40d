"""Model folders and resumable checkpoints, every save atomic (write aside, then rename)."""
import re
from pathlib import Path

import torch

from .errors import UserError
from .fileio import new_tmp_dir, recover_dir, replace_dir_atomic
from .model import ATTENTION, register_attention

CHECKPOINT = "checkpoint"
STATE_FILE = "training_state.pt"


def unwrap(model):
    """The GPT2LMHeadModel inside CausalLMLoss, DataParallel, DistributedDataParallel, torch.compile."""
    for wrapper in ("module", "_orig_mod", "lm"):
        if hasattr(model, wrapper):
            return unwrap(getattr(model, wrapper))
    return model


def save_model_folder(model, tokenizer, folder, extra=None):
    """Weights (safetensors), config and tokenizer, loadable with the Auto classes from this one folder.

    `extra` maps file names to callables writing them into the folder before it is published.
    """
    tmp = new_tmp_dir(folder)
    unwrap(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, write in (extra or {}).items():
        write(tmp / name)
    replace_dir_atomic(tmp, folder)


def rng_states():
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(output_dir, model, tokenizer, optimizer, scheduler, scaler, position, run_settings):
    """The resumable checkpoint: model folder + optimizer, scheduler, scaler, RNG states and position."""
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_states(),
             "position": position, "settings": run_settings}
    save_model_folder(model, tokenizer, Path(output_dir) / CHECKPOINT,
                      extra={STATE_FILE: lambda path: torch.save(state, path)})


def load_checkpoint(path):
    path = Path(path)
    recover_dir(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise UserError(f"--resume {path}: no resumable checkpoint there ({STATE_FILE} missing); "
                        f"start a new run without --resume")
    return torch.load(state_file, map_location="cpu", weights_only=False)


def previous_run(output_dir):
    """Names of the folders a previous run left in output_dir (empty if none)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    recover_dir(output_dir / CHECKPOINT)
    names = [p.name for p in output_dir.iterdir() if p.is_dir() and (
        p.name in (CHECKPOINT, "final_model", "best_model") or re.fullmatch(r"model_epoch\d+", p.name))]
    return sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])


def load_model_folder(model_path, tokenizer_path=None, flag="--model_path"):
    """A model folder written by train.py and its tokenizer, with clear errors for the usual mistakes.

    The tokenizer saved with the model is used; a `tokenizer_path` given as well must match it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .vocab import load_tokenizer

    model_path = Path(model_path)
    if model_path.is_file():
        raise UserError(f"{flag} {model_path}: is a file; give the folder that holds it "
                        f"(e.g. {flag} {model_path.parent})")
    recover_dir(model_path)
    if not (model_path / "config.json").is_file():
        what = "does not exist" if not model_path.exists() else "has no config.json"
        raise UserError(f"{flag} {model_path}: {what}; give a folder written by train.py, such as "
                        f"model/final_model or model/model_epoch1")
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    if (model_path / "tokenizer.json").is_file() or (model_path / "vocab.txt").is_file():
        own = AutoTokenizer.from_pretrained(model_path)
        if tokenizer is not None and tokenizer.get_vocab() != own.get_vocab():
            raise UserError(f"--tokenizer_path {tokenizer_path} ({len(tokenizer)} tokens) is not the vocabulary "
                            f"the model was trained with ({len(own)} tokens, saved in {model_path}); drop "
                            f"--tokenizer_path or give the matching file")
        tokenizer = own
    elif tokenizer is None:
        tokenizer = load_tokenizer("cache/vocab_small.txt")
    register_attention()
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation=ATTENTION)
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but {model_path} has vocab_size "
                        f"{model.config.vocab_size}: they do not belong together; give the matching --tokenizer_path")
    return model, tokenizer
