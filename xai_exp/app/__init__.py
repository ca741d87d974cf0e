"""The command: the Hydra application and its callbacks, the `xai-exp` command line, one study
job, sweeps, signals, override and version checks.

May import: everything.
"""
