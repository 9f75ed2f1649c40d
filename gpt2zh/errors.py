"""User-facing errors: a clear message and a non-zero exit instead of a traceback."""
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
