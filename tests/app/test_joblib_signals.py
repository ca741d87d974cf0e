"""Signals to a joblib sweep (`hydra/launcher=joblib`) end it like an in-process one.

The end-to-end tests start a real sweep in its own process group, wait until both worker
processes run a job (their runs RUNNING in the sqlite store), signal it and check what the
user finds: exit code 128 + signal, one line naming the signal and no traceback, the parent
run KILLED, every child KILLED or FINISHED (none RUNNING), the interrupted ones with tag
`error`. The others check the parts (`signals` in a parent and in a worker, the sweep's
closing of runs whose worker is gone) in this process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    PARENT_TAG,
    TINY_STUDY,
    restore_default_signals,
    sigint_as_default,
    study_command,
)
from mlflow.tracking import MlflowClient

from xai_exp.app import signals
from xai_exp.app.launcher import UntilStopped
from xai_exp.app.sweep import close_lost_children
from xai_exp.track.runs import RunLogger

SLOW_JOBS = (
    "hydra/launcher=joblib",
    "hydra.launcher.n_jobs=2",
    "data.limit=6",
    "lime.num_samples=3000",  # seconds per image: the jobs outlast the signal
    "lime.seed=range(0,8)",  # more jobs than workers: none may start after the signal
    "inference.engine=torch",  # no ONNX export in each worker: the jobs start sooner
)


def runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("xai-exp")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@contextlib.contextmanager
def joblib_sweep(tmp_path: Path, *overrides: str) -> Iterator[subprocess.Popen]:
    """A slow joblib sweep, the leader of its own process group (killed at the end)."""
    process = subprocess.Popen(
        study_command(tmp_path, *TINY_STUDY, *SLOW_JOBS, *overrides, multirun=True),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=sigint_as_default,
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the workers too, whatever happened
        process.communicate()


def wait_for_running_children(tmp_path: Path, process: subprocess.Popen, count: int) -> None:
    """Wait until `count` child runs are RUNNING (each worker in a job)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        if list((tmp_path / "multirun").rglob("mlflow_parent.json")):  # the store exists
            children = [r for r in runs(tmp_path) if "mlflow.parentRunId" in r.data.tags]
            if sum(c.info.status == "RUNNING" for c in children) >= count:
                return
    _, stderr = process.communicate(timeout=60) if process.poll() is not None else ("", "")
    raise AssertionError(f"no {count} jobs ran at once in time: {stderr[-3000:]}")


def check_closed_like_in_process(tmp_path: Path, process: subprocess.Popen, sig: int) -> None:
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "TerminatedWorkerError" not in stderr + stdout
    assert "BrokenProcessPool" not in stderr + stdout
    lines = [line for line in stderr.splitlines() if line.startswith("xai-exp:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "interrupted" in lines[0]
    assert sig.name in lines[0]
    every = runs(tmp_path)
    [parent] = [r for r in every if r.data.tags.get("role") == "sweep"]
    children = [r for r in every if "mlflow.parentRunId" in r.data.tags]
    assert parent.info.status == "KILLED"
    statuses = [c.info.status for c in children]
    assert "RUNNING" not in statuses, statuses
    assert set(statuses) <= {"KILLED", "FINISHED"}, statuses
    killed = [c for c in children if c.info.status == "KILLED"]
    assert len(killed) >= 2  # both running jobs were interrupted and closed their runs
    for child in killed:
        expected = "KeyboardInterrupt" if sig == signal.SIGINT else f"received {sig.name}"
        assert expected in child.data.tags["error"]
    assert len(children) < 8  # no job started after the signal


def to_group(process: subprocess.Popen, sig: int) -> None:
    os.killpg(process.pid, sig)  # the parent and its workers, as a terminal or SLURM does


def to_parent(process: subprocess.Popen, sig: int) -> None:
    process.send_signal(sig)  # `kill PID`: the workers hear of it from the parent


def pressed_three_times(process: subprocess.Popen, sig: int) -> None:
    for _ in range(3):
        os.killpg(process.pid, sig)
        time.sleep(0.3)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "send"),
    [
        (signal.SIGTERM, to_group),
        (signal.SIGINT, to_group),
        (signal.SIGTERM, to_parent),
        (signal.SIGINT, pressed_three_times),
    ],
    ids=["sigterm-group", "ctrl-c-group", "sigterm-parent", "ctrl-c-thrice"],
)
def test_a_signal_closes_every_running_job_and_the_parent(
    tmp_path: Path, sig: int, send: Callable[[subprocess.Popen, int], None]
) -> None:
    with joblib_sweep(tmp_path) as process:
        wait_for_running_children(tmp_path, process, count=2)
        send(process, sig)
        check_closed_like_in_process(tmp_path, process, sig)


@pytest.mark.slow
def test_a_worker_killed_alone_is_one_line_and_its_run_is_closed_failed(tmp_path: Path) -> None:
    with joblib_sweep(tmp_path) as process:
        wait_for_running_children(tmp_path, process, count=2)
        [victim, *_] = [r for r in runs(tmp_path) if r.info.status == "RUNNING" and PARENT_TAG in
                        r.data.tags]  # fmt: skip
        os.kill(int(victim.data.tags["process.pid"]), signal.SIGKILL)  # the OOM killer
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "Traceback" not in stderr, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if line.startswith("xai-exp:")]
    assert "a joblib worker process was killed" in line
    every = runs(tmp_path)
    [parent] = [r for r in every if r.data.tags.get("role") == "sweep"]
    assert parent.info.status == "FAILED"
    children = {r.info.run_id: r for r in every if PARENT_TAG in r.data.tags}
    assert children[victim.info.run_id].info.status == "FAILED"
    assert children[victim.info.run_id].data.tags["error"].startswith("process lost")
    assert "RUNNING" not in {r.info.status for r in children.values()}


# --------------------------------------------------------------------------- the parts


@pytest.fixture
def fresh_signals(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """`signals` as in a new process, its handlers installed; what it sends is recorded, not
    sent. Python's handlers are restored afterwards."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(signals, "_pending", [])
    monkeypatch.setattr(signals, "_stopping_since", None)
    monkeypatch.setattr(signals, "_worker_of", None)
    monkeypatch.setattr(signals, "_stopped", None)
    monkeypatch.setattr(signals, "_send", lambda pids, n: sent.extend((p, n) for p in pids))
    signals.install()
    try:
        yield sent
    finally:
        restore_default_signals()


def land(sig: int) -> None:
    """Send `sig` to this process and give it time to land."""
    os.kill(os.getpid(), sig)
    time.sleep(0.2)


def test_the_parent_passes_the_first_signal_to_its_workers_and_raises_it_after_them(
    fresh_signals, monkeypatch
):
    with signals.forwarding(lambda: [101, 102]):
        land(signal.SIGTERM)  # the group's, or `kill PID`: the workers stop too
        assert fresh_signals == [(101, signal.SIGTERM), (102, signal.SIGTERM)]
        assert signals.stop_requested() == "SIGTERM"
        land(signal.SIGINT)  # a worker's copy, or a second press: it waits for the workers
        land(signal.SIGTERM)
        assert len(fresh_signals) == 2
        assert list(UntilStopped([["a=1"], ["a=2"]])) == []  # no job starts any more
    with pytest.raises(signals.Terminated, match="SIGTERM"):  # the first one, once
        signals.raise_pending()
    monkeypatch.setattr(signals, "GRACE_S", 0.0)
    with pytest.raises(KeyboardInterrupt):  # after the grace a press raises at once
        land(signal.SIGINT)


def test_a_worker_stops_its_job_and_every_later_one_and_tells_the_parent(fresh_signals):
    signals._worker_of = os.getppid()  # as install_in_worker() sets in a joblib worker
    with pytest.raises(signals.Terminated, match="SIGTERM"), signals.interruptible():
        land(signal.SIGTERM)
    assert fresh_signals == [(os.getppid(), signal.SIGTERM)]  # the whole sweep stops
    land(signal.SIGTERM)  # the parent's copy: nothing more happens
    land(signal.SIGINT)
    assert fresh_signals == [(os.getppid(), signal.SIGTERM)]
    with signals.deferred():  # a repeat while a run is closed: the job is ending already
        land(signal.SIGINT)
    with pytest.raises(signals.Terminated, match="SIGTERM"), signals.interruptible():
        pytest.fail("a job started in a stopped worker")


def test_an_idle_worker_survives_a_signal_and_refuses_the_next_job(fresh_signals):
    signals._worker_of = os.getppid()
    land(signal.SIGINT)  # between two jobs (loky waits for the next): the worker lives on
    assert fresh_signals == [(os.getppid(), signal.SIGINT)]
    with pytest.raises(KeyboardInterrupt), signals.interruptible():
        pytest.fail("a job started in a stopped worker")


def test_worker_mode_needs_the_parent_named_by_the_sweep(monkeypatch):
    monkeypatch.setattr(signals, "_worker_of", None)
    monkeypatch.setenv(signals.WORKER_PARENT_ENV, str(os.getpid()))  # n_jobs=1: in-process
    signals.install_in_worker()
    assert not signals.in_worker()
    monkeypatch.delenv(signals.WORKER_PARENT_ENV)
    signals.install_in_worker()
    assert not signals.in_worker()


def test_runs_left_open_by_a_worker_that_is_gone_are_closed_with_the_sweep(tracking_store):
    client, experiment = tracking_store.client, tracking_store.experiment_id
    parent = RunLogger.start(client, experiment, "sweep", {})
    gone = subprocess.Popen(["true"])
    gone.wait()
    children = {}
    for name in ("killed-worker", "lost-worker", "alive"):
        children[name] = RunLogger.start(
            client, experiment, name, {}, parent_run_id=parent.run_id
        ).run_id
    for name in ("killed-worker", "lost-worker"):
        client.set_tag(children[name], "process.pid", str(gone.pid))
        client.set_tag(children[name], "process.start", "")
    runs_now = [client.get_run(children[n]) for n in ("killed-worker", "alive")]
    closed = close_lost_children(client, runs_now, interrupted=True)
    assert [r.info.status for r in closed] == ["KILLED", "RUNNING"]  # this process is alive
    assert "stopped with the sweep" in closed[0].data.tags["error"]
    [lost] = close_lost_children(client, [client.get_run(children["lost-worker"])], False)
    assert lost.info.status == "FAILED"
    assert lost.data.tags["error"].startswith("process lost")
    assert lost.data.tags[PARENT_TAG] == parent.run_id
