"""``python -m xai_exp``: the same command line as ``xai-exp``."""

import sys

from xai_exp.cli import main

if __name__ == "__main__":
    sys.exit(main())
