"""User-facing errors: a clear message and a non-zero exit instead of a traceback."""
import gc
import sys


class UserError(Exception):
    """A mistake in the user's input: the message names the file or flag and the fix."""


def run_cli(main):
    """Run a script's main(); print UserErrors as one message and exit with status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    # the interpreter's last collection at exit would walk every object torch and transformers made, to free memory
    # the process gives back anyway: 0.5-0.9 s at the prompt after generate.py on a Zen 3. Frozen, it skips them.
    gc.freeze()
