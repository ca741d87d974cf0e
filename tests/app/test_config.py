"""Every config in conf/ composes into a valid StudyConfig; bad values fail with one line."""

import pytest
from conftest import REPO_ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from xai_exp.app.hydra_app import compose_config, register_configs
from xai_exp.config import ConfigError, StudyConfig, validate
from xai_exp.explain.cam import CAM_METHODS

CONF = REPO_ROOT / "conf"
GROUPS = [
    "model",
    "data",
    "method",
    "threshold",
    "lime",
    "tracking",
    "cache",
    "metrics",
    "experiment",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


compose_study = compose_config


@pytest.mark.parametrize(
    "override",
    [f"{group}={option}" for group in GROUPS for option in options(group)]
    + ["data.dir=/tmp"],  # data=folder needs a folder
)
def test_every_config_composes_and_validates(override):
    overrides = [override]
    if override == "data=folder":
        overrides.append("data.dir=/tmp")
    if override == "data.dir=/tmp":
        overrides = ["data=folder", override]
    cfg = compose_study(overrides)
    assert isinstance(cfg, StudyConfig)
    validate(cfg)


def test_method_configs_cover_every_cam_method():
    assert options("method") == sorted(CAM_METHODS)
    for name in CAM_METHODS:
        assert compose_study([f"method={name}"]).method.name == name


def test_defaults_are_the_documented_study():
    cfg = compose_study([])
    assert (cfg.model.arch, cfg.model.target_layer) == ("efficientnet_lite0", "bn2")
    assert cfg.threshold.cam_top_fraction == 0.1
    assert (cfg.lime.num_samples, cfg.lime.num_features) == (1000, 5)
    assert cfg.lime.segmentation.algorithm == "quickshift"
    assert cfg.tracking.uri == "sqlite:///mlflow.db"


def test_seed_study_preset_sweeps_three_cams_on_resnet18():
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=seed_study"], return_hydra_config=True)
    assert cfg.model.arch == "resnet18"
    assert cfg.model.target_layer == "layer4.-1"
    assert cfg.lime.num_samples == 1000
    assert cfg.hydra.sweeper.params.method == "gradcam,scorecam,ablationcam"


def test_threshold_presets():
    fractions = {
        p: compose_study([f"threshold={p}"]).threshold.cam_top_fraction
        for p in ("top5", "top10", "top20", "top30")
    }
    assert fractions == {"top5": 0.05, "top10": 0.1, "top20": 0.2, "top30": 0.3}
    assert compose_study(["threshold=area_matched"]).threshold.lime_mode == "area_matched"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("threshold.cam_top_fraction=0", "must be in \\(0, 1\\]"),
        ("threshold.cam_top_fraction=1.5", "must be in \\(0, 1\\]"),
        ("lime.num_samples=0", "lime.num_samples=0 must be in 1..100000"),
        ("lime.num_features=0", "lime.num_features=0 must be >= 1"),
        ("lime.batch_size=0", "lime.batch_size=0 must be >= 1"),
        ("method.batch_size=-1", "method.batch_size=-1 must be >= 1"),
        ("threshold.lime_mode=best", "is not one of top_k, area_matched"),
        ("precision=fp8", "is not one of fp32, bf16"),
        ("method.target_class=-2", "or a class index >= 0"),
    ],
)
def test_bad_values_fail_validation_with_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        validate(compose_study([override]))
    assert "\n" not in str(caught.value)


def test_schema_rejects_wrong_types_and_unknown_keys():
    with pytest.raises(Exception, match="num_samples"):
        compose_study(["lime.num_samples=many"])
    with pytest.raises(Exception, match="nosuchkey"):
        compose_study(["+lime.nosuchkey=1"])


def test_study_config_round_trips_through_yaml():
    cfg = compose_study(["method=scorecam", "threshold=top20"])
    again = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(StudyConfig), OmegaConf.create(OmegaConf.to_yaml(cfg)))
    )
    assert again == cfg


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=1",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 120)
    # requeue on a time limit (the cache resumes the study), USR2 two minutes before it
    assert (launcher.max_num_timeout, launcher.signal_delay_s) == (3, 120)


def test_unknown_keys_get_one_line_with_the_closest_valid_key(capsys):
    from xai_exp.app.hydra_app import main, override_problem

    assert "did you mean threshold?" in override_problem(["threshhold=top20"])
    assert "did you mean lime.seed?" in override_problem(["-m", "lime.sed=1,2"])
    assert main(["threshhold=top20"]) == 2  # valid overrides: tests/app/test_messages.py
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("xai-exp: unknown config key 'threshhold'")
