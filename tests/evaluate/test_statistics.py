"""Intervals and paired tests: scipy's definitions, in the run summary and in `compare`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import EXPERIMENT, FakeImage
from scipy import stats

from xai_exp.compare import comparison as cmp
from xai_exp.evaluate.results import ImageResult, summary_metrics
from xai_exp.evaluate.statistics import RESAMPLES, mean_interval, paired_difference


def _scipy_interval(values, method="BCa"):
    found = stats.bootstrap(
        (np.asarray(values, dtype=float),),
        np.mean,
        confidence_level=0.95,
        n_resamples=RESAMPLES,
        method=method,
        rng=np.random.default_rng(0),
    ).confidence_interval
    return (found.low, found.high)


def test_mean_interval_is_scipys_seeded_bca_bootstrap():
    values = np.random.default_rng(4).beta(2, 5, size=40)
    low, high = mean_interval(values)
    assert (low, high) == pytest.approx(_scipy_interval(values))
    assert low < values.mean() < high
    assert mean_interval(values) == (low, high)  # seeded: the same numbers every time
    assert mean_interval([*values, None, math.nan]) == (low, high)  # missing values dropped
    assert mean_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert all(math.isnan(v) for v in mean_interval([0.3]))


def test_paired_difference_is_the_mean_difference_with_scipys_wilcoxon():
    rng = np.random.default_rng(1)
    a = rng.random(30)
    b = a - 0.05 + rng.normal(0, 0.03, 30)
    a_with_gap = [*a, 0.9]
    b_with_gap = [*b, None]  # an image only one setting compared: not a pair
    found = paired_difference(a_with_gap, b_with_gap)
    assert found.images == 30
    assert found.mean_difference == pytest.approx(float(np.mean(a - b)))
    assert found.wilcoxon_p == pytest.approx(stats.wilcoxon(a - b).pvalue)
    assert (found.ci_low, found.ci_high) == pytest.approx(_scipy_interval(a - b))
    assert found.ci_low > 0  # a is clearly higher
    same = paired_difference([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert (same.mean_difference, same.wilcoxon_p) == (0.0, 1.0)


def test_run_summary_means_carry_their_intervals():
    ious = [0.1, 0.4, 0.35, 0.8, 0.2]
    results = [ImageResult(f"i{n}", f"i{n}", values={"iou": v}) for n, v in enumerate(ious)]
    summary = summary_metrics(results)
    assert (summary["mean_iou_ci_low"], summary["mean_iou_ci_high"]) == pytest.approx(
        _scipy_interval(ious)
    )
    assert "median_iou_ci_low" not in summary  # medians and stds carry none


def test_compare_rows_have_intervals_and_paired_rows_compare_shared_images(
    tracking_store, make_study_run
):
    store = tracking_store
    client, exp = store.client, store.experiment_id
    rng = np.random.default_rng(2)
    names = [f"img{n}" for n in range(12)]
    top10 = dict(zip(names, rng.uniform(0.1, 0.5, 12), strict=True))
    top20 = {name: value + 0.1 + rng.normal(0, 0.02) for name, value in top10.items()}
    for fraction, ious in ((0.1, top10), (0.2, top20)):
        images = [FakeImage(name, float(iou)) for name, iou in ious.items()]
        make_study_run(client, exp, images, cam_top_fraction=fraction)
    # a third setting differing from both in two keys: never paired with them
    make_study_run(client, exp, [FakeImage("img0", 0.3)], method="hirescam", cam_top_fraction=0.3)
    out = store.root / "out"
    comparison = cmp.compare(store.uri, EXPERIMENT, None, out)

    row = comparison.table[comparison.table["cam_top_fraction"] == 0.1].iloc[0]
    assert (row["mean_iou_ci_low"], row["mean_iou_ci_high"]) == pytest.approx(
        _scipy_interval(list(top10.values()))
    )
    [paired] = comparison.paired.to_dict("records")
    assert (paired["differs_in"], paired["a"], paired["b"]) == ("cam_top_fraction", 0.1, 0.2)
    assert paired["others"] == "method=gradcam"
    differences = np.array([top10[n] - top20[n] for n in names])
    assert paired["images"] == 12
    assert paired["mean_difference"] == pytest.approx(differences.mean())
    assert paired["wilcoxon_p"] == pytest.approx(stats.wilcoxon(differences).pvalue)
    assert paired["ci_high"] < 0  # top 20% agrees more on every image
    assert pd.read_csv(out / cmp.PAIRED_NAME).shape == (1, len(cmp.PAIRED_COLUMNS))
    page = (out / cmp.HTML_NAME).read_text(encoding="utf-8")
    assert "Paired comparisons" in page
    assert "Wilcoxon" in page
