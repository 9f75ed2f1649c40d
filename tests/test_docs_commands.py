"""The commands the README and docs/ print for users to copy: each names flags its script has."""
import importlib.util
import re
import shlex

import pytest
from conftest import ROOT

# a command in a code block or an inline code span: what follows `python script.py` up to the span's end, a shell
# comment or the next command (a line ending in a backslash goes on)
COMMAND = re.compile(r"python ([\w/]+\.py)((?:\\\n|[^`#&;|\n])*)")


def documented_commands():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for script, arguments in COMMAND.findall(page.read_text(encoding="utf-8")):
            if "…" not in arguments:  # a command shown in part
                yield page.name, script, arguments.replace("\\\n", " ")


def script_parser(script):
    """The script's parse_args(argv), or None for one without (its flags are not checked here)."""
    path = ROOT / script
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"documented_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "parse_args", None)


def test_every_documented_command_of_a_script_with_flags_parses():
    checked, failures = 0, []
    for page, script, arguments in documented_commands():
        parse_args = script_parser(script)
        if parse_args is None:
            continue
        try:
            parse_args(shlex.split(arguments))
        except SystemExit as exit:
            if exit.code:  # --help exits with 0
                failures.append(f"{page}: python {script}{arguments}")
        checked += 1
    assert not failures, "documented commands their script refuses:\n" + "\n".join(failures)
    assert checked >= 10  # the README's train and generate commands among them


@pytest.mark.parametrize("script", ["train.py", "generate.py", "eval.py", "cpu_preset.py"])
def test_a_misspelt_flag_is_caught(script, capsys):
    with pytest.raises(SystemExit):
        script_parser(script)(["--no_such_flag", "1"])
