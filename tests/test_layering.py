"""The explanation core runs without MLflow and Hydra: importing it loads neither."""

import subprocess
import sys

CORE = [
    "xai_exp.config",
    "xai_exp.models",
    "xai_exp.data",
    "xai_exp.labels",
    "xai_exp.statistics",
    "xai_exp.method_agreement",
    "xai_exp.localisation",
    "xai_exp.annotations",
    "xai_exp.explainers.cam",
    "xai_exp.explainers.fast_cam",
    "xai_exp.explainers.lime",
    "xai_exp.inference",
    "xai_exp.onnx_engine",
    "xai_exp.explainers.superpixels",
    "xai_exp.masks",
    "xai_exp.metrics",
    "xai_exp.agreement",
    "xai_exp.faithfulness",
    "xai_exp.sanity",
    "xai_exp.cache",
    "xai_exp.pipeline",
    "xai_exp.plots",
    "xai_exp.results",
    "xai_exp.outputs",
    "xai_exp.errors",
    "xai_exp.files",
    "xai_exp.threads",
]


def test_core_imports_neither_mlflow_nor_hydra():
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in CORE)
        + "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'hydra', 'omegaconf'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
