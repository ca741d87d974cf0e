"""Models: the classifier (torchvision, timm, the bundled EfficientNet), the view of an image it
explains, its cached facts, and the forward-pass engines (torch, ONNX Runtime) with their thread
budget.

May import: `data`, `explain` (which CAM implementation runs), `xai_exp.cache`, the shared
modules. Never MLflow or Hydra.
"""
