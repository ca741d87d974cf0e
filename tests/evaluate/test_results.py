"""The metric registry: one entry reaches the CSV, the run metrics, the image series and compare."""

from __future__ import annotations

import csv
import math

import pytest
from conftest import REPO_ROOT, TINY_STUDY
from omegaconf import OmegaConf

from xai_exp.app.hydra_app import compose_config
from xai_exp.app.job import JobContext, execute
from xai_exp.compare import comparison as cmp
from xai_exp.config import StudyConfig
from xai_exp.evaluate.results import (
    METRICS,
    RECORD_COLUMNS,
    Direction,
    ImageResult,
    MetricSpec,
    Stat,
    Status,
    csv_columns,
    register,
    summary_metrics,
    unregister,
)


@pytest.fixture
def lime_share_metric():
    """A metric registered by this test alone: the share of pixels in the LIME mask."""

    def share(evidence) -> float | None:
        return None if evidence.lime_mask is None else float(evidence.lime_mask.mean())

    spec = register(
        MetricSpec(
            "lime_mask_share",
            "share of the view's pixels in the LIME mask",
            Direction.NEITHER,
            stats=(Stat.MEAN, Stat.MEDIAN),
            compute=share,
        )
    )
    yield spec
    unregister(spec.name)


def test_a_metric_added_in_one_place_reaches_every_output(
    tracking_store, tmp_path, lime_share_metric
):
    cfg = compose_config(
        [
            *TINY_STUDY,
            f"tracking.uri={tracking_store.uri}",
            f"cache.dir={tmp_path / 'cache'}",
            "metrics=iou",
        ]
    )
    mean_iou = execute(cfg, JobContext(output_dir=tmp_path / "out"))
    assert 0 <= mean_iou <= 1

    # the CSV has the column, and its values are what the function computed
    with (tmp_path / "out" / "results.csv").open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2
    for row in rows:
        assert float(row["lime_mask_share"]) == pytest.approx(float(row["reference_mask_fraction"]))
        assert row["iou_auc"] == ""  # metrics=iou: the agreement metrics are switched off
    expected = [float(row["reference_mask_fraction"]) for row in rows]

    # run metrics (each registered statistic) and the per-image series
    client = tracking_store.client
    [run] = client.search_runs([tracking_store.experiment_id])
    metrics = run.data.metrics
    assert metrics["mean_lime_mask_share"] == pytest.approx(sum(expected) / 2)
    assert metrics["median_lime_mask_share"] == pytest.approx(sum(expected) / 2)
    assert "mean_iou_auc" not in metrics
    history = client.get_metric_history(run.info.run_id, "per_image/lime_mask_share")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(expected)

    # compare reads it back from the logged results.csv as a column of its own
    comparison = cmp.compare(tracking_store.uri, out_dir=tmp_path / "cmp")
    [group] = comparison.table.to_dict("records")
    assert group["mean_lime_mask_share"] == pytest.approx(sum(expected) / 2)
    assert "mean_lime_mask_share" in (tmp_path / "cmp" / cmp.CSV_NAME).read_text()


def test_registry_rejects_a_second_metric_of_the_same_name():
    with pytest.raises(ValueError, match="already registered"):
        register(MetricSpec("iou", "again", Direction.HIGHER))
    with pytest.raises(ValueError, match="results column"):
        register(MetricSpec("status", "clash", Direction.NEITHER))


def test_csv_columns_are_the_record_then_every_metric():
    assert csv_columns() == (*RECORD_COLUMNS, *METRICS)
    assert csv_columns()[0] == "image"
    assert METRICS["randomisation_passed"].run_metrics == [
        "randomisation_pass_rate",
        "randomisation_pass_rate_ci_low",
        "randomisation_pass_rate_ci_high",
    ]
    assert METRICS["iou"].run_metrics == [
        "mean_iou",
        "mean_iou_ci_low",
        "mean_iou_ci_high",
        "median_iou",
        "std_iou",
    ]


def test_summary_counts_statuses_and_summarises_each_metric():
    results = [
        ImageResult("a", "a", values={"iou": 0.2, "randomisation_passed": True}),
        ImageResult("b", "b", values={"iou": 0.6, "randomisation_passed": False}),
        ImageResult("c", "c", status=Status.FLAGGED, values={"randomisation_passed": True}),
        ImageResult("d", "d", status=Status.ERROR),
    ]
    summary = summary_metrics(results)
    assert (summary["n_images"], summary["n_compared"]) == (4, 2)
    assert (summary["n_flagged"], summary["n_failed"]) == (1, 1)
    assert summary["mean_iou"] == pytest.approx(0.4)
    assert summary["std_iou"] == pytest.approx(0.2)
    assert summary["randomisation_pass_rate"] == pytest.approx(2 / 3)
    assert math.isnan(summary["mean_cam_seconds"])  # set by the pipeline: always reported
    assert "mean_spearman" not in summary  # computed by no image: left out


def test_result_row_writes_status_as_text():
    row = ImageResult("x", "x", status=Status.FLAGGED).row()
    assert row["status"] == "flagged"
    assert list(row) == list(csv_columns())


def test_lime_presets_carry_only_their_own_segmentation_parameters():
    slic = compose_config(["lime=slic"]).lime.segmentation
    assert slic.algorithm == "slic"
    assert "kernel_size" not in slic.params  # quickshift's parameters are not merged in
    tuned = compose_config(["lime=slic", "lime.segmentation.params.n_segments=9"])
    assert tuned.lime.segmentation.params["n_segments"] == 9
    assert compose_config([]).lime.segmentation.params == {
        "kernel_size": 4,
        "max_dist": 200,
        "ratio": 0.2,
    }


def test_config_files_hold_only_what_differs_from_the_schema():
    conf = REPO_ROOT / "conf"
    schema = StudyConfig()
    for group in ("method", "threshold", "metrics", "tracking", "cache", "model", "data"):
        defaults = getattr(schema, group)
        for path in sorted((conf / group).glob("*.yaml")):
            values = OmegaConf.to_container(OmegaConf.load(path)) or {}
            assert isinstance(values, dict)
            for key, value in values.items():
                if (group, key) == ("method", "name"):
                    continue  # a method file names its method, even the default one
                assert value != getattr(defaults, key), f"{group}/{path.name} repeats {key}"
