"""``python -m xai_exp``: the same command line as ``xai-exp``."""

from xai_exp.cli import entry

if __name__ == "__main__":
    entry()
