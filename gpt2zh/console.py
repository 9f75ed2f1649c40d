"""Progress bars that suit both a terminal and a log file."""
import sys

from tqdm import tqdm


def progress_bar(**kwargs):
    """tqdm, redrawn often on a terminal but only every 30 s when the output goes to a file."""
    interactive = sys.stderr.isatty()
    return tqdm(dynamic_ncols=True, mininterval=0.1 if interactive else 30, **kwargs)
