"""The explainer registry: one spec per explainer, plugins, any pair, one-line errors."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import REPO_ROOT, TINY_STUDY, study_command
from mlflow.tracking import MlflowClient
from tiny_models import smooth_image, tiny_classifier

from xai_exp.cache import ExplanationCache
from xai_exp.compare import comparison as cmp
from xai_exp.compare.comparison import comparison_title
from xai_exp.config import (
    ConfigError,
    LimeConfig,
    MethodConfig,
    ReferenceConfig,
    StudyConfig,
    ThresholdConfig,
)
from xai_exp.data.images import ImageItem
from xai_exp.evaluate.masks import cam_top_fraction_mask
from xai_exp.evaluate.overlap import iou
from xai_exp.explain.cam import compute_cam
from xai_exp.explain.registry import (
    EXPLAINERS,
    Family,
    Output,
    cam_method,
    explainer,
    explainers,
    load_plugins,
    register,
    unregister,
)
from xai_exp.models.architectures import Family as ModelFamily
from xai_exp.study.pipeline import Study, run_study

CONF = REPO_ROOT / "conf"
IMAGES = [
    ImageItem(name, name, smooth_image(seed=seed), f"hash-{name}", name)
    for name, seed in (("a", 2), ("b", 6))
]


def config(reference: str = "lime", method: str = "gradcam", **params) -> StudyConfig:
    lime = LimeConfig(num_samples=40, batch_size=16, hide_color=0)
    lime.segmentation.algorithm = "slic"
    lime.segmentation.params = {"n_segments": 16, "compactness": 10, "start_label": 0}
    return StudyConfig(
        method=MethodConfig(name=method),
        reference=ReferenceConfig(name=reference, params=params, batch_size=8),
        threshold=ThresholdConfig(cam_top_fraction=0.2),
        lime=lime,
        progress=False,
    )


def test_every_explainer_has_its_yaml_and_every_yaml_an_explainer():
    names = {spec.name for spec in explainers()}
    references = {path.stem: yaml.safe_load(path.read_text()) for path in CONF.glob("reference/*")}
    assert set(references) == names
    assert all(found["name"] == name for name, found in references.items())
    for name, found in references.items():  # a yaml's params are the spec's, no more
        assert set(found.get("params", {})) <= set(explainer(name).params), name
    cams = {path.stem for path in CONF.glob("method/*.yaml")}
    assert cams == {spec.name for spec in explainers() if spec.is_cam}


def test_specs_say_what_they_are():
    assert explainer("lime").output == Output.SUPERPIXELS
    assert explainer("kernelshap").output == Output.SUPERPIXELS
    assert explainer("integrated_gradients").family == Family.GRADIENT_ATTRIBUTION
    assert not explainer("integrated_gradients").forward_only  # it needs gradients
    assert explainer("rise").forward_only
    assert explainer("scorecam").forward_only
    assert not explainer("gradcam").forward_only
    assert explainer("gradcam").family == Family.GRADIENT_CAM
    assert explainer("eigencam").family == Family.ACTIVATION_CAM
    assert "captum" in explainer("occlusion").libraries


def test_unknown_names_and_params_get_one_line_with_a_guess():
    with pytest.raises(ConfigError, match=r"reference='rsie' .*did you mean reference=rise\?"):
        explainer("rsie")
    with pytest.raises(ConfigError, match=r"did you mean reference.params.num_masks\?"):
        explainer("rise").with_params({"num_mask": 10})
    with pytest.raises(ConfigError, match=r"reference=rise: params.keep_probability=1.5"):
        explainer("rise").with_params({"keep_probability": 1.5})
    with pytest.raises(ConfigError, match=r"method=rise is not a CAM method"):
        cam_method("rise")
    assert explainer("rise").with_params({"num_masks": 10})["grid_size"] == 7


def test_a_model_family_refuses_what_its_explainer_cannot_run():
    vit = ModelFamily("vit", "blocks.-1.norm1")
    with pytest.raises(ConfigError, match="reference=ablationcam does not work on vit models"):
        vit.check_method("ablationcam", "reference")
    vit.check_method("rise", "reference")  # runs on any model
    assert set(vit.refusals()) == {"ablationcam", "fullgrad", "shapleycam"}
    assert ModelFamily("resnet", "layer4.-1").refusals() == {}


def test_a_cam_as_the_reference_shares_the_cams_own_entries(tmp_path):
    classifier = tiny_classifier()
    cache = ExplanationCache(tmp_path)
    study = Study(config("scorecam"), classifier, cache)
    results = run_study(study, IMAGES, progress=False)
    for result, image in zip(results, IMAGES, strict=True):
        x = classifier.input_tensor(image.image)
        first = compute_cam(classifier, x, "gradcam", result.target_class)
        second = compute_cam(classifier, x, "scorecam", result.target_class)
        expected = iou(cam_top_fraction_mask(first, 0.2), cam_top_fraction_mask(second, 0.2))
        assert result.iou == pytest.approx(expected, abs=1e-12)
        assert "segments" not in result.arrays  # no superpixels computed for a CAM reference
        assert result.reference == "scorecam"
    again = Study(config(method="scorecam"), classifier, cache)  # scorecam's maps: cached
    assert all(r.cam_reused for r in run_study(again, IMAGES, progress=False))


PLUGIN = '''
"""A plugin explainer: the image's distance from its centre, inverted (a centre prior)."""
import numpy as np

from xai_exp.explain.registry import ExplainerSpec, Family, Output, register


def centre_prior(inputs):
    height, width = inputs.view.shape[:2]
    rows, cols = np.mgrid[0:height, 0:width]
    distance = np.hypot(rows - height / 2 + 0.5, cols - width / 2 + 0.5)
    return -distance * inputs.params["scale"] + inputs.target * 0.0


register(ExplainerSpec(
    "centre_prior", Family.PERTURBATION, Output.PIXELS, libraries=("numpy",),
    code=("centre_prior_plugin",), forward_only=True, compute=centre_prior,
    params={"scale": 1.0},
))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "centre_prior_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "centre_prior_plugin"
    unregister("centre_prior")
    sys.modules.pop("centre_prior_plugin", None)


def test_a_plugin_module_registers_an_explainer_the_study_runs_and_caches(tmp_path, plugin):
    with pytest.raises(ConfigError, match="is not a registered explainer"):
        explainer("centre_prior")
    load_plugins([plugin])
    assert EXPLAINERS["centre_prior"].params == {"scale": 1.0}
    classifier = tiny_classifier()
    cache = ExplanationCache(tmp_path / "cache")
    study = Study(config("centre_prior", scale=2.0), classifier, cache)
    results = run_study(study, IMAGES, progress=False)
    assert study.computed == 4  # a CAM and a centre prior per image
    for result in results:
        centre = cam_top_fraction_mask(result.arrays["reference_map"], 0.2)
        assert centre[16, 16]
        assert not centre[0, 0]
        assert result.iou == pytest.approx(iou(result.arrays["cam_mask"], centre))
        assert result.reference_mask_fraction == pytest.approx(0.2, abs=0.02)
    again = Study(config("centre_prior", scale=2.0), classifier, cache)
    run_study(again, IMAGES, progress=False)
    assert (again.computed, again.reused) == (0, 4)
    other = Study(config("centre_prior", scale=3.0), classifier, cache)  # params in the key
    run_study(other, IMAGES, progress=False)
    assert other.computed == 2


def test_a_plugin_that_cannot_be_imported_is_one_line():
    with pytest.raises(ConfigError, match="cannot import the plugin 'no_such_plugin_module'"):
        load_plugins(["no_such_plugin_module"])


def test_registered_names_are_taken_once():
    spec = explainer("rise")
    other = dataclasses.replace(spec, params={"num_masks": 1})
    with pytest.raises(ValueError, match="already registered"):
        register(other)
    assert register(spec) is spec  # the same spec again (a module imported twice) is fine
    assert EXPLAINERS["rise"] is spec


@pytest.mark.slow
def test_a_reference_sweep_is_one_study_with_a_row_each_and_the_agreement_matrix(tmp_path):
    references = ["lime", "kernelshap", "rise", "integrated_gradients", "occlusion", "scorecam"]
    command = study_command(
        tmp_path, *TINY_STUDY, f"reference={','.join(references)}", multirun=True
    )
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("xai-exp").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.params["reference.name"] for c in children) == sorted(references)
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.metrics["n_compared"] == 2 for c in children)

    comparison = cmp.compare(uri, "xai-exp", parent.info.run_id, tmp_path / "out")
    assert sorted(comparison.table["reference"]) == sorted(references)  # a row each
    pairs = comparison.methods
    labels = ["gradcam", "LIME", *references[1:]]
    assert {frozenset(p) for p in zip(pairs["a"], pairs["b"], strict=True)} == {
        frozenset(p) for p in itertools.combinations(labels, 2)
    }
    assert (pairs["images"] == 2).all()
    # a pixel-map reference's mask is its top 10%, like the matrix's: the same IoU both ways
    rise = next(c for c in children if c.data.params["reference.name"] == "rise")
    row = pairs[(pairs["a"] == "gradcam") & (pairs["b"] == "rise")].iloc[0]
    assert row["mean_top_f_iou"] == pytest.approx(rise.data.metrics["mean_iou"], abs=1e-9)
    assert "gradcam vs " in comparison_title(comparison.frame)
