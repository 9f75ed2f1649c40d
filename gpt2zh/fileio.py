"""Atomic writes: a crash or kill mid-write leaves the previous file or folder intact."""
import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir():
    """Where what is measured or built once per machine is kept: ~/.cache/gpt2zh (or $XDG_CACHE_HOME/gpt2zh)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2zh"


def write_text_atomic(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=0 if isinstance(obj, list) else 2))


def replace_dir_atomic(tmp_dir, final_dir):
    """Move a fully written tmp_dir to final_dir, replacing an older final_dir.

    os.replace cannot swap non-empty folders, so the old one is first renamed aside; if we die
    between the two renames, `recover_dir` finds the aside copy.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    aside = final_dir.with_name(final_dir.name + ".old")
    if aside.exists():
        shutil.rmtree(aside)
    if final_dir.exists():
        os.replace(final_dir, aside)
    os.replace(tmp_dir, final_dir)
    if aside.exists():
        shutil.rmtree(aside)


def recover_dir(final_dir):
    """If a save died between its two renames, put the previous folder back."""
    final_dir = Path(final_dir)
    aside = final_dir.with_name(final_dir.name + ".old")
    if not final_dir.exists() and aside.exists():
        os.replace(aside, final_dir)


def new_tmp_dir(final_dir):
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.tmp"))
