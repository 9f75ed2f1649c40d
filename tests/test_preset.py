"""cpu_preset.py: the preset's one command, interrupted in training and run again, finishes the same run."""
import json
import os
import re
import signal
import subprocess
import sys
from argparse import Namespace

import pytest
from conftest import ROOT, STORY


def test_the_preset_interrupted_in_training_finishes_when_run_again(project):
    body = "".join(line + "\n" for line in STORY.splitlines() if not line.startswith("第")) * 3
    novel = "".join(f"第{n}回 河边\n{body}" for n in range(1, 41))  # 40 chapters of about 550 characters
    (project / "data" / "story.txt").write_text(novel, encoding="utf-8")
    command = [sys.executable, str(ROOT / "cpu_preset.py"), "--minutes", "1.5"]
    process = subprocess.Popen(command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    output = ""
    for line in process.stdout:
        output += line
        if "saved model/cpu_preset/model_epoch1" in line:
            os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole process group
            break
    output += process.stdout.read()
    assert process.wait(timeout=600) == 2, output
    assert re.search(r"stopped (at step|after epoch) \d+", output)
    assert "Run the same command again to continue" in output
    assert "Traceback" not in output
    assert "-> 4 x " in output  # the recipe chosen from the measured speed
    state = json.loads((project / "model" / "cpu_preset" / "preset.json").read_text())
    assert state["done"] == ["data", "training"]

    again = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "continuing the preset" in again.stdout and "resuming model/cpu_preset/checkpoint: epoch " in again.stdout
    assert "this machine trains the reference model" not in again.stdout  # the recipe is kept, not chosen anew
    assert json.loads((project / "model" / "cpu_preset" / "preset.json").read_text())["done"][-1] == "samples"
    scores = json.loads((project / "model" / "cpu_preset" / "sample_scores.json").read_text())
    assert scores["summary"]["samples"] == 10 and (project / "model" / "cpu_preset" / "result.json").is_file()


def test_the_recipe_follows_the_probes_speed_an_avx2_cpu_gets_the_smaller_model():
    """The probe's speeds of 2026-12-02 (Zen 3, AVX2: 3,315 tokens/s) and of an AVX512-BF16 CPU (above 5,500)."""
    from gpt2zh.preset import choose_recipe

    assert choose_recipe(28 * 60, 3315)[0].name == "4 x 256, input noise 0.05, shifted windows, wsd"
    assert choose_recipe(28 * 60, 5500)[0].name == "4 x 320, input noise 0.05, shifted windows, wsd"


def test_a_run_started_with_a_recipe_this_version_lacks_is_told_how_to_go_on():
    """preset.json of a run started before a recipe changed names a row the table no longer has."""
    import cpu_preset
    from gpt2zh.errors import UserError
    from gpt2zh.preset import PresetState

    state = PresetState("0" * 64, 1, 30.0, recipe="4 x 256, input noise 0.2")
    with pytest.raises(UserError, match="'4 x 256, input noise 0.2', which this version of the preset no longer has; "
                                        "finish it with the version that started it, or delete model/cpu_preset/"):
        cpu_preset.pick_recipe(Namespace(recipe="auto"), state, 0.0, 1, 1)
