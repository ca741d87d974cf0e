"""Sweeps as real SLURM jobs (hydra/launcher=slurm) against an `mlflow server` on 127.0.0.1.

Needs a reachable SLURM cluster: `eval "$(.ci/slurm.sh start)"` starts a single-node one on
this machine (root; CI does it, see .ci/run). Without one the tests are skipped, unless
XAI_EXP_REQUIRE_SLURM=1, which makes them fail instead. The jobs run this checkout's code:
the environment (PYTHONPATH, SLURM_CONF) travels with sbatch, and submitit starts the jobs
with this interpreter.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PARENT_TAG, REPO_ROOT, RUN_PY, TINY_STUDY
from mlflow.tracking import MlflowClient
from PIL import Image
from tiny_models import smooth_image

from xai_exp.data.images import list_folder, select

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REQUIRE_SLURM_ENV = "XAI_EXP_REQUIRE_SLURM"
# jobs that fit one small node: no GPU, one CPU, 2 GB each (the shipped defaults ask for more)
SMALL_JOBS = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=10",
]


def slurm_problem() -> str | None:
    """Why no SLURM cluster answers here (one line), or None."""
    if shutil.which("sinfo") is None:
        return "sinfo not found (apt-get install slurm-wlm munge; .ci/slurm.sh start)"
    try:
        done = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"sinfo failed: {error}"
    if done.returncode != 0:
        return f"sinfo failed: {done.stderr.strip()[-200:]}"
    if not {"idle", "mixed", "allocated"} & set(done.stdout.split()):
        return f"no usable SLURM node (sinfo: {done.stdout.split()})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    """A reachable SLURM cluster (skip, or fail under XAI_EXP_REQUIRE_SLURM=1)."""
    problem = slurm_problem()
    if problem is None:
        return
    message = f"SLURM not available: {problem}; start one with .ci/slurm.sh start"
    if os.environ.get(REQUIRE_SLURM_ENV) == "1":
        pytest.fail(f"{message}; {REQUIRE_SLURM_ENV}=1 requires it")
    pytest.skip(message)


@pytest.fixture(scope="module")
def server(slurm, mlflow_server_factory, tmp_path_factory, empty_mlflow_db):
    """One `mlflow server` for the module: SQLite backend, proxied artifacts, in tmp."""
    root = tmp_path_factory.mktemp("slurm-mlflow")
    shutil.copyfile(empty_mlflow_db, root / "mlflow.db")
    started = mlflow_server_factory(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root)
    yield started
    started.stop()


def job_env() -> dict[str, str]:
    """This environment, with the checkout first on the import path (sbatch passes it on)."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def sweep_command(tmp_path: Path, uri: str, experiment: str, *overrides: str) -> list[str]:
    return [
        sys.executable, str(RUN_PY), "-m", *SMALL_JOBS,
        f"tracking.uri={uri}", f"tracking.experiment={experiment}",
        f"cache.dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *overrides,
    ]  # fmt: skip


def runs_of(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    return client, parents, children


def image_folder(root: Path, count: int = 8, shards: int = 4) -> Path:
    """`count` tiny images whose path hashes put at least one in each of `shards` shards."""
    folder = root / "images"
    for n in range(count):
        (folder / ("goldfish" if n % 2 else "tabby")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(32, n)).save(folder / ("goldfish" if n % 2 else "tabby")
                                                  / f"{n}.png")  # fmt: skip
    listed = list_folder(folder)
    sizes = [len(select(listed, num_shards=shards, shard=k)) for k in range(shards)]
    assert all(sizes), sizes  # every shard has work
    assert sum(sizes) == count
    return folder


def compare_table(uri: str, parent: str, out: Path) -> list[dict[str, str]]:
    done = subprocess.run(
        [sys.executable, "-m", "xai_exp", "compare", "--tracking-uri", uri,
         "--parent", parent, "--out", str(out)],
        cwd=out.parent, capture_output=True, text=True, timeout=300, env=job_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return list(csv.DictReader(io.StringIO((out / "comparison.csv").read_text())))


def per_image_iou(results_csv: Path) -> dict[str, float]:
    rows = csv.DictReader(io.StringIO(results_csv.read_text(encoding="utf-8")))
    return {row["image"]: float(row["iou"]) for row in rows if row["iou"]}


# --------------------------------------------------------------------------- sweeps and shards


def test_method_sweep_of_four_shard_arrays_pools_like_one_process(server, tmp_path):
    folder = image_folder(tmp_path)
    study = [o for o in TINY_STUDY if not o.startswith("data.limit")]
    study += [f"data.dir={folder}", "lime.num_samples=20"]
    command = sweep_command(
        tmp_path, server.url, "slurm-shards", *study,
        "method=gradcam,scorecam", "data.num_shards=4", "data.shard=0,1,2,3",
    )  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=job_env()
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    _, [parent], children = runs_of(server.url, "slurm-shards")
    assert len(children) == 8
    assert {c.info.status for c in children} == {"FINISHED"}
    assert parent.info.status == "FINISHED"
    assert all(c.data.tags["slurm.job_id"] for c in children)  # they ran as SLURM jobs
    assert sum(c.data.metrics["n_images"] for c in children) == 2 * 8

    # the console: one line about accounting (no warning per poll), then the end block
    console = done.stdout + done.stderr
    assert console.count("sacct") == 1, console
    assert "SLURM accounting is off" in console
    assert "Bypassing" not in console
    lines = done.stdout.splitlines()
    end = f"xai-exp: sweep finished: 8 runs under parent run {parent.info.run_id}"
    block = lines[lines.index(end) :]  # the end block closes the console, as for local sweeps
    assert len(block) == 5, block  # best setting, report, parent run, sweep folder
    assert f"  sweep folder   {tmp_path / 'sweep'}" in block
    assert any(line.startswith("  report ") for line in block)
    assert any(f"/runs/{parent.info.run_id}" in line for line in block)
    print(f"SLURM sweep of 8 jobs: {seconds:.0f} s")

    # compare pools each method's 4 shards into one row holding every image once
    table = compare_table(server.url, parent.info.run_id, tmp_path / "cmp")
    assert len(table) == 2
    assert {row["runs"] for row in table} == {"4"}
    assert {row["images"] for row in table} == {"8"}

    # ... and equals one process on the same images (own cache: computed again)
    single = [
        sys.executable, str(RUN_PY), "-m", *study, "method=gradcam,scorecam",
        f"tracking.uri={server.url}", "tracking.experiment=slurm-single",
        f"cache.dir={tmp_path / 'cache-single'}", f"hydra.sweep.dir={tmp_path / 'single'}",
    ]  # fmt: skip
    alone = subprocess.run(
        single, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=job_env()
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    grid = list(csv.DictReader(io.StringIO((tmp_path / "cmp" / "iou_per_image.csv").read_text())))
    for number, method in enumerate(("gradcam", "scorecam")):
        expected = per_image_iou(tmp_path / "single" / str(number) / "results.csv")
        assert len(expected) == 8
        pooled = {}
        for child in children:
            if child.data.params["method.name"] == method:
                pooled.update(per_image_iou(Path(child.data.tags["output_dir"]) / "results.csv"))
        assert pooled == pytest.approx(expected, abs=1e-9)
        [row] = [r for r in table if r["method"] == method]
        assert float(row["mean_iou"]) == pytest.approx(sum(expected.values()) / 8, abs=1e-9)
    assert len(grid) == 8


# --------------------------------------------------------------------------- preemption


def _job_ids(sweep_dir: Path) -> dict[int, str]:
    """Array task number -> SLURM job id (``12_0``), from submitit's folders."""
    found = {}
    for path in (sweep_dir / ".submitit").glob("*_*"):
        array, _, task = path.name.partition("_")
        if array.isdigit() and task.isdigit():
            found[int(task)] = path.name
    return found


def _rows(results_csv: Path) -> int:
    try:
        return max(0, len(results_csv.read_text(encoding="utf-8").splitlines()) - 1)
    except OSError:
        return 0


def _state(job: str) -> str:
    done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    return done.stdout.strip()


def _wait_for(predicate, timeout: float, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the sweep ended before {what}:\n{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_time_limit_and_preemption_kill_then_requeue_and_resume(server, tmp_path):
    sweep_dir = tmp_path / "sweep"
    study = [o for o in TINY_STUDY if not o.startswith("data.limit")]
    # 6 images of a few seconds each: both jobs are still mid-study when they are signalled
    study += ["data.limit=6", "lime.num_samples=4000"]
    # two LIME seeds, not two methods: jobs of two methods share LIME's cache entries, and the
    # one behind would race through the images the other explained first
    command = sweep_command(tmp_path, server.url, "slurm-preempt", *study,
                            "lime.seed=0,1")  # fmt: skip
    sweep = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=job_env(),
    )  # fmt: skip
    try:
        _wait_for(lambda: len(_job_ids(sweep_dir)) == 2, 120, "both jobs were submitted", sweep)
        jobs = _job_ids(sweep_dir)
        # job 0: SIGTERM (the time limit itself, or scancel): KILLED, not requeued;
        # job 1: USR2, submitit's preemption signal: KILLED, requeued, resumed. Each is sent
        # as soon as its job has two images done, so both are mid-study however the two
        # jobs share the CPUs
        signals_for = {0: "--signal=TERM", 1: "--signal=USR2"}

        def two_done() -> list[int]:
            return [t for t in signals_for if _rows(sweep_dir / str(t) / "results.csv") >= 2]

        while signals_for:
            _wait_for(lambda: bool(two_done()), 240, "a job finished two images", sweep)
            for task in two_done():
                subprocess.run(["scancel", signals_for.pop(task), jobs[task]], check=True,
                               timeout=30)  # fmt: skip
        # SLURM holds a requeued job for cred_expire + 1 s (21 s on .ci/slurm.sh's cluster) so
        # that the node forgets its revoked credential. Not skipped: with `scontrol update
        # StartTime=now` the requeued job ended FAILED without output twice in CI
        _wait_for(lambda: _state(jobs[1]) == "PENDING", 120, "job 1 was requeued", sweep)
        out, err = sweep.communicate(timeout=400)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
    assert sweep.returncode == 1, err[-3000:]  # job 0 failed the sweep
    stopped = f"xai-exp: SLURM job {jobs[0]} stopped by SIGTERM"
    assert stopped in err, err[-3000:]
    assert "Traceback" not in err

    client, [parent], children = runs_of(server.url, "slurm-preempt")
    by_job = {}
    for child in children:
        by_job.setdefault(int(child.data.tags["job_num"]), []).append(child)
    # job 0: one run, KILLED, its finished images uploaded
    [killed] = by_job[0]
    assert killed.info.status == "KILLED"
    assert killed.data.tags["error"] == "Terminated: received SIGTERM"
    uploaded = {f.path for f in client.list_artifacts(killed.info.run_id)}
    assert "results.csv" in uploaded
    local = tmp_path / "dl0"
    client.download_artifacts(killed.info.run_id, "results.csv", str(local))
    assert 2 <= _rows(local / "results.csv") < 6

    # job 1: the KILLED run, then the requeued job's run that resumed it and FINISHED
    first, resumed = sorted(by_job[1], key=lambda r: r.info.start_time)
    assert first.info.status == "KILLED"
    assert first.data.tags["error"].startswith("Terminated: received SIGUSR2")
    assert first.data.tags["resumed_by"] == resumed.info.run_id
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumes_run"] == first.info.run_id
    assert resumed.data.tags["slurm.job_id"] == first.data.tags["slurm.job_id"] == jobs[1]
    assert (first.data.tags["slurm.restart_count"], resumed.data.tags["slurm.restart_count"]) == (
        "0", "1")  # fmt: skip
    done_before = _rows(Path(first.data.tags["output_dir"]) / "results.csv")
    client.download_artifacts(first.info.run_id, "results.csv", str(tmp_path / "dl1"))
    partial = _rows(tmp_path / "dl1" / "results.csv")
    assert partial >= 2
    # each image exactly once, the finished ones from the cache
    final = Path(resumed.data.tags["output_dir"]) / "results.csv"
    names = [r["image"] for r in csv.DictReader(io.StringIO(final.read_text(encoding="utf-8")))]
    assert sorted(names) == sorted(set(names))
    assert len(names) == 6
    assert resumed.data.metrics["n_images"] == 6
    assert resumed.data.metrics["explanations_reused"] >= 2 * partial  # CAM and LIME each
    history = client.get_metric_history(resumed.info.run_id, "per_image/iou")
    assert sorted(m.step for m in history) == sorted(set(m.step for m in history))
    assert done_before == 6  # the folder's results.csv is the resumed run's, complete

    # the parent: KILLED (job 0 stopped and was not resumed), with the comparison
    assert parent.info.status == "KILLED"
    assert f"xai-exp: sweep killed: 3 runs under parent run {parent.info.run_id}" in out
    # one line for the missing accounting, none per poll
    assert (out + err).count("sacct") == 1


def test_slurm_signals_are_left_alone_outside_a_job(monkeypatch):
    """Outside a SLURM job the study's handlers are the usual ones: no USR2, no requeue."""
    from xai_exp.app import slurm

    monkeypatch.delenv("SUBMITIT_FOLDER", raising=False)
    before = signal.getsignal(signal.SIGUSR2)
    slurm.take_over_signals()
    assert signal.getsignal(signal.SIGUSR2) is before
    assert not slurm.in_job()


def test_launcher_defaults_fit_a_cpu_partition():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from xai_exp.app.hydra_app import config_dir, register_configs

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.gpus_per_node is None  # a CPU job unless asked: no GPU partition needed
    assert (launcher.cpus_per_task, launcher.mem_gb) == (4, 8)
