"""One line on stderr, exit code 2, for each mistake a new user makes (issue #22)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from xai_exp.app import startup, versions
from xai_exp.app.hydra_app import main, override_problem
from xai_exp.app.overrides import expand_home
from xai_exp.models import hub

RUN_PY = REPO_ROOT / "run.py"


@pytest.fixture(autouse=True)
def keep_argv(monkeypatch):
    """`main` sets sys.argv for Hydra: restored after each test."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed once we leave: nothing listens there


def one_line(capsys) -> str:
    """The only line written to stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["method=nosuch"], ["method=nosuch is not a method option", "scorecam", "gradcam"]),
        (["method=gradcma"], ["did you mean method=gradcam?"]),
        (["-m", "method=gradcam,scorecma"], ["did you mean method=scorecam?"]),
        (["lime=slick"], ["lime=slick is not a lime option; did you mean lime=slic?"]),
        (["model=resnet19"], ["did you mean model=resnet18?"]),
        (["threshold=top15"], ["threshold=top15 is not a threshold option"]),
        (["lime.num_samples=abc"], ["lime.num_samples='abc': expected an integer"]),
        (["-m", "lime.num_samples=10,abc"], ["lime.num_samples='abc': expected an integer"]),
        (["threshold.cam_top_fraction=big"], ["threshold.cam_top_fraction='big'", "a number"]),
        (["data.limit=[1,2"], ["cannot read the override 'data.limit=[1,2'", "quote"]),
        (["data.dir=~nosuchuser_xai/photos"], ["unquoted ~", "'data.dir=\"~nosuchuser_xai/"]),
        (["threshhold=top20"], ["unknown config key 'threshhold'; did you mean threshold?"]),
    ],
)
def test_each_override_mistake_is_one_line_exit_2(capsys, args, expected):
    assert main(args) == 2
    line = one_line(capsys)
    assert line.startswith("xai-exp: ")
    for words in expected:
        assert words in line


def test_valid_overrides_pass_the_checks():
    valid = [
        "lime.seed=3",
        "lime=slic",
        "+extra.key=1",
        "hydra/launcher=joblib",
        "hydra.job.chdir=true",
        "lime.segmentation.params.n_segments=4",
        "experiment=seed_study",
        "method=gradcam,scorecam",
        "lime.num_samples=range(10,30,10)",
        "data.limit=null",
        "model.input_size=null",
        "method.target_class=true",
        "data.dir=${oc.env:HOME}",
        'data.dir="~/photos"',
        "model=timm",
        "+model.kwargs.depth=2",
    ]
    assert override_problem(["-m", *valid]) is None
    assert "did you mean lime.seed?" in override_problem(["-m", "lime.sed=1,2"])


def test_a_home_path_is_expanded_as_a_shell_would(monkeypatch):
    monkeypatch.setenv("HOME", "/tmp/with space")
    assert expand_home(["data.dir=~/photos", "-m"]) == ["data.dir=/tmp/with space/photos", "-m"]
    kept = ["data.dir=~nosuchuser_xai/a", "data.dir=~/a,~/b", "~data.dir", "-cd", "x=1", "d=~/[x]"]
    assert expand_home(kept) == kept  # Hydra's message (quote it) or Hydra's own meaning
    assert override_problem(expand_home(["data.dir=~/photos"])) is None


def test_version_is_one_line_exit_0(capsys):
    from xai_exp.app.cli import main as cli_main

    assert main(["--version"]) == 0  # python run.py --version, xai-exp run --version
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith("xai-exp ")
    assert "torch " in out[0]
    with pytest.raises(SystemExit) as stop:
        cli_main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip().splitlines() == out


def test_torch_and_torchvision_pairing():
    assert versions.pairing_problem("2.14.1", "0.29.1") is None  # the pair installed here
    assert versions.pairing_problem("2.0.1", "0.15.2") is None
    assert versions.pairing_problem("2.5.1+cu124", "0.20.1+cu124") is None
    assert versions.pairing_problem("1.13.1", "0.14.1") is None  # not covered by the rule
    problem = versions.pairing_problem("2.14.1+cpu", "0.28.0")
    assert problem is not None
    assert "torch 2.14.1+cpu and torchvision 0.28.0 do not match" in problem
    assert 'pip install "torchvision==0.29.*" --index-url https://download.pytorch.org/whl/cpu' in (
        problem
    )
    assert versions.torch_mismatch() is None  # this environment works


def test_a_torch_torchvision_mismatch_stops_at_start(capsys, monkeypatch):
    found = {"torch": "2.14.1", "torchvision": "0.27.0"}
    monkeypatch.setattr(versions, "installed", found.get)
    started = time.perf_counter()
    assert main(["method=gradcam"]) == 2
    assert time.perf_counter() - started < 10  # no Hydra, no torch
    line = one_line(capsys)
    assert "torch 2.14.1 and torchvision 0.27.0 do not match" in line
    assert 'pip install "torchvision==0.29.*"' in line


def test_the_torchvision_import_error_is_one_line():
    from xai_exp.app.hydra_app import user_message

    error = RuntimeError("operator torchvision::nms does not exist")
    line = user_message(error)
    assert line is not None
    assert "\n" not in line
    assert "torchvision::nms" in line
    assert 'pip install "torchvision==0.' in line
    assert user_message(RuntimeError("CUDA out of memory")) is None


def test_the_hub_is_probed_once_and_read_offline_when_unreachable(monkeypatch):
    from huggingface_hub import constants

    port = closed_port()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.unreachable_hub.cache_clear()
    try:
        with hub.offline_unless_reachable() as unreachable:
            assert unreachable == f"127.0.0.1:{port}"
            assert constants.is_offline_mode()
        assert not constants.is_offline_mode()
        assert hub.unreachable_hub.cache_info().misses == 1
    finally:
        hub.unreachable_hub.cache_clear()


def test_seconds_loading_counts_from_the_process_start(monkeypatch):
    import xai_exp

    assert startup.process_age() >= time.perf_counter() - xai_exp.IMPORTED
    monkeypatch.setattr(startup, "_jobs_started", 0)
    first = startup.job_started()
    assert first <= xai_exp.IMPORTED  # the first job of a process: from its start
    assert time.perf_counter() - startup.job_started() < 1  # a later job: from now


def run_py(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command, from tmp_path, with its own cache and no MLflow store."""
    command = [sys.executable, str(RUN_PY), "tracking=none", f"cache.dir={tmp_path}/cache", *args]
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env={**environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["method=nosuch"], "method=nosuch is not a method option"),
        (["lime.num_samples=abc"], "lime.num_samples='abc': expected an integer"),
        (["data.dir=~nosuchuser_xai/photos"], "quote the value"),
    ],
)
def test_the_command_prints_one_line_and_exits_2(tmp_path, args, expected):
    done = run_py(tmp_path, *args)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert expected in line


def test_offline_timm_weights_fail_in_seconds_in_one_line(tmp_path):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    done = run_py(tmp_path, "model=timm", "model.arch=resnet10t", "progress=false", env=env)
    assert time.monotonic() - started < 40  # ten retries with back-off took ~50 s
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "cannot be reached" in line
    assert "model.weights=null" in line
    assert "Retrying" not in done.stdout + done.stderr
