"""xai-exp entry point: `python run.py [overrides]` or `python run.py -m [sweep overrides]`."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works from any directory, uninstalled

from xai_exp.cli import register_configs, run_job

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Compose the config and run one study (one job of a sweep)."""
    return run_job(cfg)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("xai-exp: interrupted; the run is marked KILLED", file=sys.stderr)
        sys.exit(130)
