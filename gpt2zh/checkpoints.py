"""Model folders and resumable checkpoints, every save atomic (write aside, then rename)."""
import re
from pathlib import Path

import torch

from .articles import ARTICLE_END, ARTICLE_START, marker_ids
from .errors import UserError
from .fileio import new_tmp_dir, recover_dir, replace_dir_atomic
from .model import context_length, load_config, load_pretrained, sampling_config
from .vocab import folder_tokenizer, load_tokenizer, vocab_tokens

CHECKPOINT = "checkpoint"
STATE_FILE = "training_state.pt"


def unwrap(model):
    """The GPT2LMHeadModel inside CausalLMLoss, DataParallel, DistributedDataParallel, torch.compile."""
    for wrapper in ("module", "_orig_mod", "lm"):
        if hasattr(model, wrapper):
            return unwrap(getattr(model, wrapper))
    return model


def record_vocabulary(model, tokenizer):
    """Write the article format's token ids into the model's config and generation config, so that plain
    transformers' generate() ends an article where we do, pads as we do and, like generate.py, never
    produces [UNK], [PAD] or the ids a config's vocab_size reserves beyond the vocabulary."""
    lm = unwrap(model)
    start, end, _ = marker_ids(tokenizer)
    never = [tokenizer.unk_token_id, tokenizer.pad_token_id, *range(len(tokenizer), lm.config.vocab_size)]
    for config in (lm.config, lm.generation_config):
        config.bos_token_id, config.eos_token_id = start, end
    # The pad id only where generate() reads it: in the model's config GPT-2 would look for it in every batch
    # (a GPU sync a step, and a warning for each padded one).
    lm.config.pad_token_id, lm.generation_config.pad_token_id = None, tokenizer.pad_token_id
    lm.generation_config.suppress_tokens = never


def save_model_folder(model, tokenizer, folder, extra=None):
    """Weights (safetensors), config and tokenizer, loadable with the Auto classes from this one folder.

    `extra` maps file names to callables writing them into the folder before it is published.
    """
    tmp = new_tmp_dir(folder)
    lm = unwrap(model)
    lm.save_pretrained(tmp)
    tokenizer.model_max_length = context_length(lm.config)
    tokenizer.save_pretrained(tmp)
    for name, write in (extra or {}).items():
        write(tmp / name)
    replace_dir_atomic(tmp, folder)


def rng_states():
    """The random generators' states: the CPU's, every CUDA GPU's, an Apple GPU's."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])


def save_checkpoint(output_dir, model, tokenizer, state):
    """The resumable checkpoint: the model folder and `state` (training.TrainingState.state_dict(): optimizer,
    schedule, scaler, random generators, position, the run's flags and weight average) beside it."""
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


def check_vocabulary(tokenizer, config, model_name, vocab_name, external):
    """Refuse a vocabulary that does not belong to the model. An `external` one (not saved with the model)
    must also have the article markers' ids the model's config records, or, where it records none (the
    original GPT2-Chinese's folders), exactly the model's vocab_size."""
    problems, recorded = [], []
    if external:
        start, end, _ = marker_ids(tokenizer)
        recorded = [(value, name, own) for value, name, own in (
            (getattr(config, "bos_token_id", None), ARTICLE_START, start),
            (getattr(config, "eos_token_id", None), ARTICLE_END, end))
            if value is not None and value < config.vocab_size]
        problems = [f"{name} is id {own} there but {value} in the model"
                    for value, name, own in recorded if value != own]
    if len(tokenizer) > config.vocab_size or (external and not recorded and len(tokenizer) != config.vocab_size):
        problems.insert(0, f"{len(tokenizer)} tokens for a model of vocab_size {config.vocab_size}")
    if problems:
        raise UserError(f"{vocab_name} is not the vocabulary of {model_name} ({'; '.join(problems)}); "
                        f"give the vocabulary the model was trained with")


def open_model_folder(model_path, tokenizer_path=None, flag="--model_path", sampling=False):
    """The config and tokenizer of a model folder: one written by train.py, by the original GPT2-Chinese
    (config.json without model_type, pytorch_model.bin, the vocabulary given with --tokenizer_path) or in the
    Hugging Face layout (vocab.txt or tokenizer.json beside the weights), with clear errors for the usual
    mistakes. The vocabulary saved with the model is used; a `tokenizer_path` given as well must match it.
    `sampling`: read without transformers where the folder allows (model.sampling_config, vocab.SavedTokenizer)."""
    model_path = Path(model_path)
    if model_path.is_file():
        raise UserError(f"{flag} {model_path}: is a file; give the folder that holds it "
                        f"(e.g. {flag} {model_path.parent})")
    recover_dir(model_path)
    if not (model_path / "config.json").is_file():
        what = "does not exist" if not model_path.exists() else "has no config.json"
        raise UserError(f"{flag} {model_path}: {what}; give a folder written by train.py, such as "
                        f"model/final_model or model/model_epoch1")
    config = (sampling_config if sampling else load_config)(model_path / "config.json", "the model's config")
    own = folder_tokenizer(model_path, sampling)
    if tokenizer_path:
        given = load_tokenizer(tokenizer_path)
        if own is not None and vocab_tokens(given) != vocab_tokens(own):
            raise UserError(f"--tokenizer_path {tokenizer_path} ({len(given)} tokens) is not the vocabulary the "
                            f"model was trained with ({len(own)} tokens, saved in {model_path}); drop "
                            f"--tokenizer_path or give the matching file")
        if own is None:
            check_vocabulary(given, config, model_path, f"--tokenizer_path {tokenizer_path}", external=True)
            return config, given
    elif own is None:
        raise UserError(f"{flag} {model_path}: has no vocabulary saved with it (a folder of the original "
                        f"GPT2-Chinese?); give the one it was trained with, e.g. --tokenizer_path cache/vocab.txt")
    check_vocabulary(own, config, model_path, f"the vocabulary saved in {model_path}", external=False)
    return config, own


def load_model_folder(model_path, tokenizer_path=None, flag="--model_path"):
    """open_model_folder, and the model with its weights."""
    config, tokenizer = open_model_folder(model_path, tokenizer_path, flag)
    return load_pretrained(Path(model_path), config, flag), tokenizer
