"""Threads that fit the job's share: affinity, cgroup quota, SLURM, the inference.threads
override, and the count reaching torch, ONNX Runtime and the run's tags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TINY_STUDY
from mlflow.tracking import MlflowClient

from xai_exp.app.hydra_app import compose_config
from xai_exp.app.job import JobContext, execute
from xai_exp.config import ConfigError, validate
from xai_exp.models import threads
from xai_exp.models.threads import cgroup_cpus, cpu_share, inference_threads
from xai_exp.study.steps import superpixel_worker_count

NO_LIMITS: dict[str, str] = {}  # an environment without SLURM_CPUS_PER_TASK or OMP_NUM_THREADS


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    """Each test starts unconfigured and leaves torch's thread count as it found it."""
    monkeypatch.setattr(threads, "_configured", None)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def write_files(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return folder


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000"}, None),
        ({"cpu.max": "100000 100000"}, 1),
        ({"cpu.max": "150000 100000"}, 1),  # 1.5 CPUs: rounded down
        ({"cpu.max": "400000 100000"}, 4),
        ({"cpu.max": "20000 100000"}, 1),  # a fifth of a CPU still runs one thread
        ({"cpu.max": "garbage"}, None),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "250000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 2),
        ({}, None),
    ],
)
def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path, files, expected):
    assert cgroup_cpus(write_files(tmp_path, files)) == expected


@pytest.mark.parametrize(
    ("own", "files", "expected"),
    [
        ("0::/job/step", {"job/cpu.max": "200000 100000", "job/step/cpu.max": "max 100000"}, 2),
        ("0::/job/step", {"job/cpu.max": "300000 100000", "job/step/cpu.max": "100000 100000"}, 1),
        ("0::/job/step", {"other/cpu.max": "100000 100000"}, None),
        ("0::/../outside", {"cpu.max": "max 100000"}, None),
        (
            "1:name=systemd:/job\n4:cpu,cpuacct:/job",
            {
                "cpu,cpuacct/job/cpu.cfs_quota_us": "200000",
                "cpu,cpuacct/job/cpu.cfs_period_us": "100000",
            },
            2,
        ),
    ],
)
def test_the_quota_of_the_process_own_cgroup_and_its_parents_counts(tmp_path, own, files, expected):
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(own + "\n")
    root = write_files(tmp_path / "fs", files)
    assert cgroup_cpus(root, proc) == expected


def test_a_cgroup_quota_below_the_affinity_sets_the_share(tmp_path):
    if threads.affinity_cpus() < 2:
        pytest.skip("needs two CPUs")
    root = write_files(tmp_path, {"cpu.max": "100000 100000"})
    assert cpu_share(root, NO_LIMITS) == threads.ThreadCount(1, "cgroup quota")
    unlimited = write_files(tmp_path / "none", {"cpu.max": "max 100000"})
    assert cpu_share(unlimited, NO_LIMITS) == threads.ThreadCount(
        threads.affinity_cpus(), "affinity"
    )


@pytest.mark.parametrize("name", ["SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"])
def test_slurm_and_omp_limits_are_honoured_and_invalid_values_ignored(tmp_path, name):
    if threads.affinity_cpus() < 2:
        pytest.skip("needs two CPUs")
    assert cpu_share(tmp_path, {name: "1"}) == threads.ThreadCount(1, name)
    for invalid in ("0", "-2", "two", "", "1.5"):
        assert cpu_share(tmp_path, {name: invalid}).source == "affinity", invalid
    assert cpu_share(tmp_path, {name: "4096"}).source == "affinity"  # above the share


def test_the_override_wins_over_every_limit(tmp_path):
    root = write_files(tmp_path, {"cpu.max": "100000 100000"})
    limited = {"SLURM_CPUS_PER_TASK": "1", "OMP_NUM_THREADS": "1"}
    assert inference_threads(3, root, limited) == threads.ThreadCount(3, "inference.threads")
    assert inference_threads(None, root, limited).threads == 1
    assert inference_threads(3, root, limited).describe() == "3 (inference.threads)"
    assert inference_threads(None, root, NO_LIMITS).describe() == "1 (CPU share: cgroup quota)"


@pytest.mark.parametrize("value", [0, -1])
def test_config_rejects_a_thread_count_below_one_in_one_line(value):
    with pytest.raises(ConfigError, match=f"inference.threads={value} must be null") as caught:
        validate(compose_config([f"inference.threads={value}"]))
    assert "\n" not in str(caught.value)
    validate(compose_config(["inference.threads=2"]))
    assert compose_config([]).inference.threads is None


def test_configured_threads_reach_torch_once_it_is_loaded():
    threads.configure_threads(1)
    assert torch.get_num_threads() == 1  # torch is loaded here: set at once
    assert threads.threads_in_use() == threads.ThreadCount(1, "inference.threads")
    from tiny_models import tiny_classifier

    torch.set_num_threads(2)  # something else changed it: building a network sets it back
    tiny_classifier()
    assert torch.get_num_threads() == 1


def test_gpu_superpixel_workers_fit_the_cpu_share(monkeypatch):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 3)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "CGROUP_ROOT", Path("/nonexistent"))  # no quota
    assert superpixel_worker_count(None, "cuda") == 2  # one of the three CPUs left to the model
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 1)
    assert superpixel_worker_count(None, "cuda") == 1


def test_configuring_threads_does_not_load_torch():
    code = (
        "import sys\n"
        "from xai_exp.models import threads\n"
        "count = threads.configure_threads(None)\n"
        "print(count.threads >= 1, 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.split() == ["True", "False"], done.stderr[-2000:]


RESTRICTED = """
import os, sys
import torch
before = torch.get_num_threads()
first = min(os.sched_getaffinity(0))
os.sched_setaffinity(0, {first})
from xai_exp.models import inference
from xai_exp.models import threads
from tiny_models import tiny_classifier
share = threads.cpu_share()
classifier = tiny_classifier()
after_build = torch.get_num_threads()
engine = inference.prepare_for_inference(classifier, "onnxruntime")
session = inference._prepared(classifier).onnx.session
print(before, share.threads, share.source, after_build, torch.get_num_threads(), engine,
      session.get_session_options().intra_op_num_threads)
"""


def test_a_restricted_affinity_gives_torch_and_onnx_runtime_one_thread():
    if threads.affinity_cpus() < 2:
        pytest.skip("needs two CPUs to restrict to one")
    env = {
        k: v for k, v in os.environ.items() if k not in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    done = subprocess.run(
        [sys.executable, "-c", RESTRICTED], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before, share, source, built, prepared, engine, onnx = done.stdout.split()
    assert int(before) >= 2  # torch started with more threads than the process may now use
    assert (share, source) == ("1", "affinity")
    assert (built, prepared) == ("1", "1")
    assert (engine, onnx) == ("onnxruntime", "1")


def test_a_run_tags_its_thread_count(tmp_path):
    overrides = [
        *TINY_STUDY,
        "data.limit=1",
        "lime.num_samples=10",
        "inference.threads=1",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"cache.dir={tmp_path}/cache",
    ]
    torch.set_num_threads(2)
    execute(compose_config(overrides), JobContext(output_dir=tmp_path / "out"))
    assert torch.get_num_threads() == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("xai-exp").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["inference_threads"] == "1"
    params = json.loads((tmp_path / "out" / "explanation_params.json").read_text())
    assert params["inference_threads"] == 1
