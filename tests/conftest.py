import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "xiyouji.txt"
TINY_CONFIG = ROOT / "config" / "model_config_tiny.json"
# The sampling kernels measured during the tests are remembered here, not in the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gpt2zh-test-cache-")

# Our own writing (not from any novel): two chapters, long enough for a few 32-token windows.
STORY = """第一回 小河边的早晨
河水清清，柳树弯弯。小明每天早上都到河边读书，他说读书的声音和水的声音很配。
有一天，他看见一只白鹅在水里游来游去，好像在找什么东西。
第二回 白鹅的朋友
白鹅游到岸边，叫了三声。小明把带来的馒头掰成小块，放在石头上。
白鹅吃完馒头，又叫了两声，然后慢慢游走了。从那以后，它每天早上都来。
"""


def run(script, *args, cwd, check=True, env=None):
    """Run one of the project's scripts as a user would; return the CompletedProcess."""
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_project(path):
    """A working folder laid out like the project: config/, cache/, data/ with a story in it."""
    shutil.copytree(ROOT / "config", path / "config")
    shutil.copytree(ROOT / "cache", path / "cache")
    (path / "data").mkdir()
    (path / "data" / "story.txt").write_text(STORY * 6, encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path)


def train_args(**overrides):
    """Flags of a tiny, fast CPU training run."""
    flags = {"--model_config": TINY_CONFIG, "--tokenizer_path": "cache/vocab_small.txt", "--epochs": 2,
             "--batch_size": 4, "--stride": 32, "--num_pieces": 2, "--min_length": 10, "--log_step": 5,
             "--device": "cpu", "--precision": "fp32", "--warmup_steps": 2, "--lr": 1e-3}
    flags.update(overrides)
    args = []
    for flag, value in flags.items():
        if value is True:
            args.append(flag)
        elif value is not None:
            args += [flag, str(value)]
    return args


@pytest.fixture
def prepared(project):
    """The project after txt_to_json.py and clr_ctrl.py."""
    run("txt_to_json.py", cwd=project)
    run("clr_ctrl.py", cwd=project)
    return project


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny trained model, shared by the tests that only read it."""
    path = make_project(tmp_path_factory.mktemp("trained"))
    run("txt_to_json.py", cwd=path)
    run("clr_ctrl.py", cwd=path)
    (path / "data" / "eval.json").write_text(json.dumps([STORY * 2], ensure_ascii=False), encoding="utf-8")
    run("train.py", *train_args(), "--raw", "--eval_data_path", "data/eval.json", cwd=path)
    return path
