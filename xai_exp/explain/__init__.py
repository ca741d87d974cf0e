"""Explainers: the registry of every explanation method (`registry`) and their code: CAM maps
from grad-cam with exact fast paths, LIME and superpixels, KernelSHAP, Occlusion and Integrated
Gradients from Captum, RISE.

May import: `models`, the shared modules. Never MLflow or Hydra.
"""
