"""Data: where images come from (the bundled samples, a folder, datasets), decoded and checked,
with their labels and annotations.

May import: `xai_exp.config`, `xai_exp.errors`, `xai_exp.files`. Never MLflow or Hydra.
"""
