"""``python -m xai_exp``: the same command line as ``xai-exp``."""

from xai_exp.app.cli import entry

if __name__ == "__main__":
    entry()
