"""MLflow access: opening a store, finding experiments and runs, logging runs (client API only).

Shared by the Hydra job, the sweep callback and ``xai-exp compare``. Every URI that is printed,
logged or put in a message goes through `redact_uri` first, so a password never leaks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no lock, as before
    fcntl = None  # type: ignore[assignment]

from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from xai_exp.errors import describe
from xai_exp.track.masking import mask, remember, secrets_in

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "role"  # "sweep" on a sweep's parent run
BATCH = 100  # MLflow's limit of params (and tags) per log_batch call
METRIC_BATCH = 1000  # its limit of metrics per call


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and what to do."""


# --------------------------------------------------------------------------- URIs


def redact_uri(uri: str) -> str:
    """The URI without its secrets (safe to print, log and put in a report): the password of
    its userinfo and secret query values (``?password=``, ``&token=``...), see `masking.mask`.
    Never parses the URI, so a malformed one (a port out of range) is masked too."""
    remember(uri)
    return mask(uri)


def scrub(text: str, uri: str) -> str:
    """`text` with the URI's secrets masked (MLflow's errors quote the full request URL)."""
    remember(uri)
    return mask(text, secrets_in(uri))


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other URIs and in-memory ones)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def is_server(uri: str) -> bool:
    """Whether the URI names a tracking server (rather than a local store)."""
    return uri.startswith(("http://", "https://"))


def unreachable(uri: str, error: BaseException, hint: str) -> TrackingError:
    """The one-line error for a store that does not answer (password masked)."""
    state = "is unreachable" if is_server(uri) else "cannot be used"
    return TrackingError(
        f"tracking store {redact_uri(uri)} {state} ({scrub(describe(error, 160), uri)}); " + hint
    )


@contextlib.contextmanager
def temporary_env(values: Mapping[str, str]) -> Iterator[None]:
    """Temporarily set environment variables (MLflow reads its settings at each request)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# MLflow's own defaults (7 retries, backoff factor 2, 120 s timeout) spend ~4 minutes on each
# call to a server that is gone, ~16 minutes over the calls at the end of a run. xai-exp's
# processes use these unless the environment sets them: a refused connection fails after
# ~15 s (retries after 0, 4 and 8 s), a server that hangs after ~75 s (4 x 15 s + the waits).
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


def bound_http_retries() -> None:
    """Give MLflow's HTTP client `HTTP_LIMITS`, each unless the environment sets it already
    (set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=7`` etc. to wait longer for a flaky server)."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def fail_fast_http() -> contextlib.AbstractContextManager[None]:
    """No HTTP retries and a short timeout: an unreachable server is reported at once."""
    return temporary_env(
        {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    )


@contextlib.contextmanager
def store_creation_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a sqlite store (MLflow creates and migrates it then).

    Two runs started at the same moment in a fresh folder would both migrate the new file; an
    exclusive lock on its folder lets the second wait until the first has created it.
    """
    path = _sqlite_path(uri)
    if path is None or path.exists() or fcntl is None:
        yield
        return
    folder = path.resolve().parent
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # no such folder: MLflow's own error says so
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def unwritable(uri: str) -> str | None:
    """Why a sqlite store cannot be written (a read-only file or folder), else None.

    MLflow would retry opening a new database for minutes, or fail each write of a run with a
    traceback. This tries what SQLite needs, root-proof (``chattr +i``, a read-only mount):
    opening the file for writing and creating a file (its journal) in its folder.
    """
    path = _sqlite_path(uri)
    if path is None:
        return None
    folder = path.parent
    if not folder.is_dir():
        return None  # MLflow's own error names the missing folder
    try:
        if path.exists():
            with path.open("r+b"):
                pass
    except OSError as error:
        return f"cannot write {path}: {error.strerror or error}"
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".xai-exp-write-test-"):
            pass
    except OSError as error:
        return f"cannot create a file in {folder}: {error.strerror or error}"
    return None


def connect(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """Client and experiment id (created when missing); one line when the store is unusable.

    Creating the experiment here, once, before any job starts avoids parallel jobs racing to
    create it in the same store. A read-only sqlite store is one line at once (`unwritable`).
    """
    problem = unwritable(uri)
    if problem is not None:
        raise TrackingError(
            f"tracking store {redact_uri(uri)} is read-only ({problem}); make it writable, "
            "or set tracking.uri=sqlite:///A/WRITABLE/FILE.db (or tracking=none)"
        )
    try:
        with fail_fast_http(), store_creation_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                return client, found.experiment_id
            try:
                return client, client.create_experiment(experiment)
            except Exception:
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                return client, found.experiment_id
    except Exception as error:
        raise unreachable(
            uri,
            error,
            "start the server or set tracking.uri=sqlite:///mlflow.db (or tracking=none)",
        ) from error


def open_store(uri: str) -> MlflowClient:
    """A client for reading `uri`; a sqlite URI must name an existing file (never create one)."""
    path = _sqlite_path(uri)
    if path is not None and not path.is_file():
        raise TrackingError(
            f"tracking store {redact_uri(uri)} not found: there is no file {path} "
            "(run a study first, or pass --tracking-uri)"
        )
    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as error:  # an unsupported scheme, a malformed URI
        hint = "pass --tracking-uri sqlite:///FILE or http://HOST:PORT"
        raise unreachable(uri, error, hint) from error


def resolve_experiment(client: MlflowClient, uri: str, name: str) -> str:
    """Experiment id for `name`, or a TrackingError naming the experiments that exist."""
    with fail_fast_http():
        try:
            found = client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            names = [e.name for e in client.search_experiments(max_results=20)]
        except Exception as error:  # any store failure (MlflowException, OSError...): one line
            raise unreachable(uri, error, "start the server or pass --tracking-uri") from error
    known = ", ".join(repr(n) for n in names) or "none"
    raise TrackingError(
        f"experiment {name!r} not found at {redact_uri(uri)} (experiments there: {known}); "
        "pass --experiment"
    )


def resolve_run(client: MlflowClient, uri: str, run_id: str) -> Run:
    """The run with this id, or a TrackingError when it does not exist."""
    with fail_fast_http():
        try:
            return client.get_run(run_id)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise TrackingError(
                    f"run {run_id} not found at {redact_uri(uri)}; pass a parent run id "
                    "(the sweep's mlflow_parent.json names it)"
                ) from error
            raise unreachable(uri, error, "start the server or pass --tracking-uri") from error
        except Exception as error:
            raise unreachable(uri, error, "start the server or pass --tracking-uri") from error


def is_sweep_parent(run: Run) -> bool:
    """True for the parent run the sweep callback creates (tag role=sweep)."""
    return run.data.tags.get(ROLE_TAG) == "sweep"


def search_all_runs(
    client: MlflowClient, experiment_ids: Sequence[str], filter_string: str = ""
) -> list[Run]:
    """Every active run matching the filter, oldest first, across result pages."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            list(experiment_ids),
            filter_string=filter_string,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """The runs whose parent is `parent_run_id`, oldest first."""
    return search_all_runs(client, [experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'")


def _process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


HEARTBEAT_TAG = "process.heartbeat"  # seconds since the epoch, renewed while the run is open
HEARTBEAT_S = 60.0  # how often an open run renews its heartbeat
STALE_AFTER_S = 10 * HEARTBEAT_S  # a run whose heartbeat is older than this is lost


def _pid_namespace() -> str:
    """This process's PID namespace (``pid:[4026531836]``): pids mean nothing across them."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_tags() -> dict[str, str]:
    """Who runs this process: host, PID namespace, pid, start time and a first heartbeat, so a
    lost process can be told."""
    return {
        "process.host": socket.gethostname(),
        "process.pid_namespace": _pid_namespace(),
        "process.pid": str(os.getpid()),
        "process.start": _process_start(os.getpid()) or "",
        HEARTBEAT_TAG: str(int(time.time())),
    }


def process_gone(tags: Mapping[str, str], now: float | None = None) -> bool:
    """True when the process named by `process_tags` no longer runs.

    Where its pid means something here (this host, this PID namespace) the pid answers at once;
    anywhere else (another node, a container with its own PID namespace) only a heartbeat
    older than `STALE_AFTER_S` says it is gone. Runs without either cannot be judged.
    """
    host, pid = tags.get("process.host"), tags.get("process.pid", "")
    namespace = tags.get("process.pid_namespace") or _pid_namespace()  # older runs: this one
    if host == socket.gethostname() and namespace == _pid_namespace() and pid.isdigit():
        return _pid_gone(int(pid), tags.get("process.start"))
    beat = tags.get(HEARTBEAT_TAG, "")
    if beat.isdigit():
        return (time.time() if now is None else now) - int(beat) > STALE_AFTER_S
    return False  # another machine and an older run: nothing can be said from here


def _pid_gone(pid: int, started: str | None) -> bool:
    """True when `pid` (started at `started` ticks, when known) no longer runs here."""
    if Path("/proc/self/stat").exists():
        current = _process_start(pid)
        started = started or current  # no start recorded: existence alone
        return current is None or current != started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


OUTPUT_DIR_TAG = "output_dir"  # the run's local output folder
SERVER_LOST_FILE = "tracking_lost.json"  # in the output folder: its run could not be closed


def server_lost(error: BaseException) -> bool:
    """True when `error` says the tracking server stopped answering (after MLflow's retries):
    a refused or dropped connection, a timeout, or a gateway's 502/503/504 (the server behind
    a proxy is gone). MLflow wraps the `requests` error without ``from``: the chain says it."""
    import requests
    import urllib3.exceptions

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current,
            (
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                urllib3.exceptions.ProtocolError,
                ConnectionError,
                TimeoutError,
            ),
        ):
            return True
        text = str(current)
        if any(
            f"error code {code}" in text or f"too many {code} error responses" in text
            for code in (502, 503, 504)
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def write_lost_marker(out_dir: Path, run: RunLogger, uri: str) -> Path | None:
    """Record in `out_dir` that `run` could not be closed because its server was lost; the
    next `mark_lost_runs` on that store closes it, naming the folder (None: not writable)."""
    import json

    from xai_exp.files import atomic_write_text

    marker = {
        "run_id": run.run_id,
        "experiment_id": run.experiment_id,
        "tracking_uri": redact_uri(uri),
        "output_dir": str(out_dir),
        "lost_at": int(time.time()),
        "error": scrub(describe(run.lost, 300), uri) if run.lost is not None else "",
    }
    try:
        return atomic_write_text(out_dir / SERVER_LOST_FILE, json.dumps(marker, indent=2) + "\n")
    except OSError as error:
        log.warning("could not record the lost run in %s: %s", out_dir, describe(error))
        return None


def read_lost_marker(tags: Mapping[str, str], run_id: str) -> dict[str, Any] | None:
    """The `write_lost_marker` record of this run, when its output folder (tag `output_dir`)
    is on this machine and holds one for this run id."""
    import json

    folder = tags.get(OUTPUT_DIR_TAG)
    if not folder:
        return None
    try:
        marker = json.loads((Path(folder) / SERVER_LOST_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("run_id") == run_id else None


def _upload_local_results(client: MlflowClient, run_id: str, folder: Path) -> None:
    """Log the small result files of a lost run's folder (results.csv, summary.json)."""
    for name in ("results.csv", "summary.json"):
        path = folder / name
        if path.is_file():
            try:
                client.log_artifact(run_id, str(path))
            except Exception as error:  # noqa: BLE001 - closing the run matters more
                log.info("could not upload %s of run %s: %s", path, run_id, describe(error))


def lost_process_reason(tags: Mapping[str, str]) -> str:
    """The `error` tag of a run whose process ended without closing it."""
    return (
        f"process lost: pid {tags.get('process.pid')} on {tags.get('process.host')} "
        "ended without closing the run (killed, or out of memory, or its node lost)"
    )


def mark_lost_runs(client: MlflowClient, experiment_ids: Sequence[str]) -> list[str]:
    """Mark RUNNING runs whose process is gone (kill -9, the OOM killer) as FAILED, and those
    whose process lost the tracking server (`write_lost_marker`): their tag `error` names the
    local results, results.csv and summary.json are uploaded."""
    lost = []
    for run in search_all_runs(client, experiment_ids, "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        marker = read_lost_marker(tags, run.info.run_id)
        if marker is None and not process_gone(tags):
            continue
        if marker is not None:
            folder = Path(str(marker.get("output_dir") or tags[OUTPUT_DIR_TAG]))
            reason = f"tracking server lost mid-run; local results in {folder}"
            _upload_local_results(client, run.info.run_id, folder)
        else:
            reason = lost_process_reason(tags)
        client.set_tag(run.info.run_id, "error", reason)
        client.set_terminated(run.info.run_id, "FAILED")
        log.warning("run %s (%s) marked FAILED: %s", run.info.run_id, run.info.run_name, reason)
        lost.append(run.info.run_id)
    return lost


CLASSIC_VIEW = "workflowType=machine_learning"  # MLflow 3 opens runs in its GenAI view otherwise
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # experiment tag MLflow's UI reads a view from
TABLE_COLUMNS = ("mean_iou_corrected", "mean_iou", "mean_iou_chance", "top1_accuracy")  # best first


def ui_base(uri: str) -> str:
    """The MLflow UI's address: the server itself, or `mlflow ui` on its default port."""
    return redact_uri(uri).rstrip("/") if is_server(uri) else "http://127.0.0.1:5000"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI, in its classic (model training) view."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}?{CLASSIC_VIEW}"


def table_view(columns: Sequence[str] = TABLE_COLUMNS) -> tuple[str, str]:
    """The runs table's view as MLflow's UI shares one: its key and the tag's JSON value.

    Sorted by the first column (highest first), the metric columns shown; the key is a
    digest of the value, so one view is one tag however many runs write it.
    """
    import hashlib
    import json

    shown = [f"metrics.`{name}`" for name in columns]
    value = json.dumps({"orderByKey": shown[0], "orderByAsc": False, "selectedColumns": shown})
    return "xai-exp-" + hashlib.sha256(value.encode()).hexdigest()[:12], value


def share_table_view(client: MlflowClient, experiment_id: str) -> str | None:
    """Store `table_view` on the experiment (idempotent); its key, or None when refused."""
    key, value = table_view()
    try:
        experiment = client.get_experiment(experiment_id)
        if experiment.tags.get(SHARED_VIEW_TAG + key) != value:
            client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, value)
    except Exception as error:  # noqa: BLE001 - a read-only store: the plain table link
        log.info("could not store the runs table's view: %s", describe(error))
        return None
    return key


def runs_table_url(uri: str, experiment_id: str, view_key: str | None = None) -> str:
    """The experiment's runs table in the classic view.

    With `view_key` (`share_table_view`) MLflow's UI opens it sorted by ``mean_iou`` with the
    `TABLE_COLUMNS` shown; without, sorted by ``mean_iou`` only (MLflow shows no metric
    column then). MLflow reads these parameters on ``/runs`` only: on the experiment's own
    address it redirects and drops them.
    """
    base = f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?"
    if view_key:
        return f"{base}viewStateShareKey={view_key}&{CLASSIC_VIEW}"
    return f"{base}orderByKey=metrics.%60{TABLE_COLUMNS[0]}%60&orderByAsc=false&{CLASSIC_VIEW}"


def quiet_downloads() -> contextlib.AbstractContextManager[None]:
    """No per-file download progress bars on stderr."""
    return temporary_env({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config to dotted keys: {'lime': {'seed': 0}} -> {'lime.seed': 0}."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunLogger:
    """One MLflow run, written through the client (no global active run)."""

    def __init__(
        self, client: MlflowClient, run_id: str, experiment_id: str = "", name: str = ""
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.name = name
        self._closed = threading.Event()
        self.lost: BaseException | None = None  # the error that said the server is gone

    def __getstate__(self) -> dict[str, Any]:
        """What pickles (a joblib sweep ships the sweep callback that holds its parent run):
        all but the heartbeat's event, which belongs to the process that beats."""
        state = self.__dict__.copy()
        del state["_closed"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._closed = threading.Event()

    def _send(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Make one client call, unless the server is lost. The first call that fails with
        `server_lost` (after MLflow's bounded retries, `bound_http_retries`) marks it lost:
        every later call is skipped, so the run's local work goes on and ends without paying
        the retry budget again; the job then says so (`job.execute`)."""
        if self.lost is not None:
            return
        try:
            call(*args, **kwargs)
        except Exception as error:
            if not server_lost(error):
                raise
            if self.lost is None:
                self.lost = error
                log.debug("tracking server lost for run %s: %s", self.run_id, error)

    def beat(self, every: float = HEARTBEAT_S) -> None:
        """Renew the run's heartbeat tag every `every` seconds until `finish`, in a daemon
        thread (a failed write is retried at the next beat: the run is still alive)."""

        def renew() -> None:
            while not self._closed.wait(every) and self.lost is None:
                try:
                    self._send(
                        self.client.set_tag, self.run_id, HEARTBEAT_TAG, str(int(time.time()))
                    )
                except Exception as error:  # noqa: BLE001 - a lost server must not stop the run
                    log.debug("heartbeat of run %s not written: %s", self.run_id, error)

        threading.Thread(target=renew, name=f"heartbeat-{self.run_id}", daemon=True).start()

    @classmethod
    def start(
        cls,
        client: MlflowClient,
        experiment_id: str,
        run_name: str | None,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> RunLogger:
        """Create a run (a child of `parent_run_id` when given) that beats until `finish`;
        secrets in its name and tags (a swept tracking URI) are masked."""
        all_tags = {**process_tags(), **{key: mask(str(value)) for key, value in tags.items()}}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        name = mask(run_name) if run_name else run_name
        run = client.create_run(experiment_id, run_name=name, tags=all_tags)
        logger = cls(client, run.info.run_id, experiment_id, run.info.run_name)
        logger.beat(heartbeat_s)
        return logger

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params in batches; values are stringified (None as 'null'), secrets masked."""
        items = [
            Param(key, "null" if value is None else mask(str(value))[:6000])
            for key, value in params.items()
        ]
        for start in range(0, len(items), BATCH):
            self._send(self.client.log_batch, self.run_id, params=items[start : start + BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags in one batch (secrets masked)."""
        items = [RunTag(key, mask(str(value))[:5000]) for key, value in tags.items()]
        for start in range(0, len(items), BATCH):
            self._send(self.client.log_batch, self.run_id, tags=items[start : start + BATCH])

    def log_metrics(self, metrics: Mapping[str, float | bool | None], step: int = 0) -> None:
        """Finite metrics in batches (NaN and None are skipped: MLflow charts cannot show them)."""
        stamp = _now_ms()
        items = [
            Metric(key, float(value), stamp, step)
            for key, value in metrics.items()
            if value is not None and math.isfinite(float(value))
        ]
        for start in range(0, len(items), BATCH):
            self._send(self.client.log_batch, self.run_id, metrics=items[start : start + BATCH])

    def log_series(self, rows: Sequence[tuple[int, Mapping[str, float | bool | None]]]) -> None:
        """Per-step metrics of many steps, batched across steps (NaN and None skipped)."""
        stamp = _now_ms()
        items = [
            Metric(key, float(value), stamp, step)
            for step, metrics in rows
            for key, value in metrics.items()
            if value is not None and math.isfinite(float(value))
        ]
        for start in range(0, len(items), METRIC_BATCH):
            self._send(
                self.client.log_batch, self.run_id, metrics=items[start : start + METRIC_BATCH]
            )

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        """Upload a local folder's files (nothing when it is missing or empty)."""
        if folder.is_dir() and any(folder.iterdir()):
            self._send(self.client.log_artifacts, self.run_id, str(folder), artifact_path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload one local file."""
        self._send(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_table(self, data: Any, artifact_file: str) -> None:
        """A table MLflow shows in its artifact viewer."""
        self._send(self.client.log_table, self.run_id, data=data, artifact_file=artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        """Terminate the run with FINISHED, FAILED or KILLED (its heartbeat stops)."""
        self._closed.set()
        self._send(self.client.set_terminated, self.run_id, status=status)


def terminal_status(error: BaseException | None) -> str:
    """MLflow status for how a run ended."""
    if error is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(error, KeyboardInterrupt):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FAILED)
