"""xai-exp from a checkout: `python run.py [overrides]` or `python run.py -m [sweep overrides]`.

The same as the installed `xai-exp run ...`; Python puts this file's folder on the import path,
so the checkout's `xai_exp` package is the one that runs.
"""

from xai_exp.app.cli import exit_fast
from xai_exp.app.hydra_app import main

if __name__ == "__main__":
    exit_fast(main)
