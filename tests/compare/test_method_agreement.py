"""Method x method agreement in `compare`, read back from the runs' cached maps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_STUDY

from xai_exp.app import cli
from xai_exp.app.hydra_app import compose_config
from xai_exp.app.job import JobContext, execute
from xai_exp.compare import comparison as cmp
from xai_exp.compare.method_agreement import LIME, as_matrix
from xai_exp.data.images import bundled_images
from xai_exp.evaluate.agreement import rank_correlation
from xai_exp.evaluate.masks import cam_top_fraction_mask
from xai_exp.evaluate.overlap import iou
from xai_exp.explain import cam as cam_module
from xai_exp.explain.cam import compute_cam
from xai_exp.models.classifier import fit_to_input, load_classifier


@pytest.mark.slow
def test_a_method_sweep_gets_its_agreement_matrix_from_the_cache(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = [*TINY_STUDY, "lime.num_samples=20", f"tracking.uri={uri}", f"cache.dir={tmp_path}/c"]
    for method in ("gradcam", "hirescam"):
        cfg = compose_config([*base, f"method={method}"])
        execute(cfg, JobContext(output_dir=tmp_path / method))

    def no_recompute(*args, **kwargs):
        raise AssertionError("compare recomputed a map")

    monkeypatch.setattr(cam_module, "compute_cam", no_recompute)
    comparison = cmp.compare(uri, "xai-exp", None, tmp_path / "out")
    monkeypatch.undo()

    pairs = comparison.methods
    assert set(zip(pairs["a"], pairs["b"], strict=True)) == {
        ("gradcam", "hirescam"),
        ("gradcam", LIME),
        ("hirescam", LIME),
    }
    assert (pairs["images"] == 2).all()
    # the reference: both CAMs computed afresh on the same views
    cfg = compose_config(base)
    classifier = load_classifier(cfg.model, "cpu")
    ious, rhos = [], []
    for item in bundled_images(2):
        view = fit_to_input(item.image, cfg.model.input_size)
        tensor = classifier.input_tensor(view)
        target = int(np.argmax(classifier.predict(view)[0]))
        maps = [compute_cam(classifier, tensor, m, target) for m in ("gradcam", "hirescam")]
        masks = [cam_top_fraction_mask(m, 0.1) for m in maps]
        ious.append(iou(*masks))
        rhos.append(rank_correlation(*maps))
    row = pairs[(pairs["a"] == "gradcam") & (pairs["b"] == "hirescam")].iloc[0]
    assert row["mean_top_f_iou"] == pytest.approx(np.mean(ious), abs=1e-6)
    assert row["mean_spearman"] == pytest.approx(np.mean(rhos), abs=1e-6)
    assert as_matrix(pairs, "mean_top_f_iou").loc["hirescam", "gradcam"] == row["mean_top_f_iou"]
    saved = pd.read_csv(tmp_path / "out" / cmp.MATRIX_NAME)
    assert len(saved) == 3
    page = (tmp_path / "out" / cmp.HTML_NAME).read_text(encoding="utf-8")
    assert "Method agreement" in page
    assert cli.main(["compare", "--tracking-uri", uri, "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "method agreement, mean_top_f_iou (top 0.1" in printed
    assert "hirescam" in printed.split("method agreement, mean_top_f_iou")[1]
