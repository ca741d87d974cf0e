"""The Hydra application: compose the config, run one study job, one line for user errors.

``xai-exp run [overrides]`` (installed) and ``python run.py [overrides]`` (checkout) both end
here. The config groups are ``conf/`` at the top of the checkout, shipped inside the package
as ``xai_exp/conf`` when installed.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from xai_exp.app import launcher, overrides, signals, slurm, startup, versions
from xai_exp.app.job import JobContext, NothingComparedError, execute
from xai_exp.app.sweep import close_open_sweeps, record_failed_job
from xai_exp.config import ConfigError, StudyConfig
from xai_exp.data.images import DataError
from xai_exp.errors import ModelLoadError
from xai_exp.track import masking
from xai_exp.track.runs import TrackingError, bound_http_retries

USER_ERRORS = (ConfigError, DataError, ModelLoadError, TrackingError, NothingComparedError)
# Hydra's flags that only print (help, the composed config): no torch check before them
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion")


def config_dir() -> Path:
    """The config groups: ``xai_exp/conf`` when installed, else ``conf/`` of the checkout."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parent / "conf"


class JobError(CompactHydraException):
    """A user-facing failure: Hydra prints its message alone, without a traceback."""


def output_dir_problem(directory: str, key: str) -> str | None:
    """Why the run's output folder cannot be created or written (one line), or None."""
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)  # Hydra creates it next, at the same path
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return (
            f"cannot write the output folder {folder} ({key}): {error.strerror or error}; "
            f"set {key}=PATH to a writable folder"
        )
    return None


class OutputDirCheck(Callback):
    """Hydra callback: an output folder that cannot be written is one line, exit code 2,
    before Hydra's own mkdir would fail with a traceback."""

    def _check(self, directory: str, key: str) -> None:
        problem = output_dir_problem(directory, key)
        if problem is not None:
            print(f"xai-exp: {problem}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        self._check(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        self._check(str(config.hydra.sweep.dir), "hydra.sweep.dir")


def register_configs() -> None:
    """Register the typed schema that every composed config is validated against."""
    ConfigStore.instance().store(name="study_schema", node=StudyConfig)
    launcher.register()  # hydra/launcher=joblib: interrupts close every job's run


def to_study_config(cfg: DictConfig) -> StudyConfig:
    """The typed config of the job (Hydra's own node removed)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    merged = OmegaConf.merge(OmegaConf.structured(StudyConfig), plain)
    study = OmegaConf.to_object(merged)
    assert isinstance(study, StudyConfig)
    return study


def compose_config(overrides: Sequence[str] = ()) -> StudyConfig:
    """The config `xai-exp run` would use with these overrides (Hydra's compose API)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return to_study_config(cfg)


def override_problem(args: Sequence[str]) -> str | None:
    """One line for the first override Hydra would reject (`overrides.problem`), else None."""
    return overrides.problem(args, config_dir())


def job_context(started: float | None = None) -> JobContext:
    """Hydra's facts about this job: output dir, run mode, sweep dir, overrides, choices;
    `started` is the job's start (`startup.job_started`)."""
    if not HydraConfig.initialized():
        return JobContext(output_dir=Path.cwd(), started=started)
    config = HydraConfig.get()
    multirun = config.mode == RunMode.MULTIRUN
    return JobContext(
        output_dir=Path(config.runtime.output_dir),
        multirun=multirun,
        sweep_dir=str(Path(config.sweep.dir).resolve()) if multirun else None,
        override_dirname=config.job.override_dirname or "",
        job_num=config.job.num if multirun else None,  # set in sweeps only
        task_overrides=tuple(config.overrides.task),
        choices={
            k: str(v) for k, v in config.runtime.choices.items() if not k.startswith("hydra/")
        },
        started=started,
    )


def user_message(error: BaseException) -> str | None:
    """The one line for an error the user can fix, else None (a bug: its traceback)."""
    if isinstance(error, USER_ERRORS):
        return str(error)
    return versions.broken_torchvision(error)


def run_job(cfg: DictConfig) -> float:
    """Hydra task: one clear line for user errors, a FAILED run for anything else."""
    context = job_context(startup.job_started())
    masking.protect_output()  # a job in another process (the joblib launcher) masks its own
    masking.remember(str(cfg.get("tracking", {}).get("uri", "")))
    slurm.take_over_signals()  # in a SLURM job: SIGTERM and USR2 stop the study, run KILLED
    signals.install_in_worker()  # a joblib worker closes its run KILLED on a signal
    try:
        with signals.interruptible():  # Hydra's own code between jobs is never interrupted
            return execute(to_study_config(cfg), context)
    except KeyboardInterrupt as error:
        if signals.in_worker():  # the worker lives on; its parent stops the sweep
            name = error.signal_name if isinstance(error, signals.Terminated) else "SIGINT"
            raise signals.WorkerInterrupted(name) from None
        if not slurm.in_job():
            raise
        # the run is closed: submitit requeues the job (exits here), or it fails in one line
        raise JobError(f"xai-exp: {slurm.end_of_job(error)}") from None
    except Exception as error:
        problem = user_message(error)
        if problem is None:
            raise
        message = f"xai-exp: {problem}"
        if context.multirun:
            record_failed_job(context.sweep_dir, context.override_dirname, problem)
            raise JobError(message) from None
        print(message, file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    """Compose the config and run one study (one job of a sweep)."""
    return run_job(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Run studies with Hydra; `argv` are Hydra's arguments (default: the command line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:  # Hydra's own would name Hydra's version alone
        print(versions.version_line())
        return 0
    masking.remember(*args)  # secrets in overrides (tracking.uri=http://u:pw@...) are
    masking.protect_output()  # masked in all Hydra, MLflow and we print, log and store
    args = overrides.expand_home(args)
    sys.argv = [sys.argv[0], *args]
    problem = override_problem(args)
    if problem is None and not any(a.split("=")[0] in INFO_FLAGS for a in args):
        problem = versions.torch_mismatch()
    if problem is not None:
        print(f"xai-exp: {problem}", file=sys.stderr)
        return 2
    register_configs()
    bound_http_retries()  # a lost server: bounded time, not MLflow's minutes per call
    signals.install()
    try:
        hydra_main()
        signals.raise_pending()  # one that arrived after the last job
    except KeyboardInterrupt as error:
        close_open_sweeps(interrupted=True)
        print(f"xai-exp: interrupted ({str(error) or 'received SIGINT'})", file=sys.stderr)
        return signals.exit_code(error)
    finally:
        close_open_sweeps(interrupted=False)  # a failed job: Hydra skips on_multirun_end
    return 0
