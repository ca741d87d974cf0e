"""xai-exp: compare image explanations (a CAM method against LIME or another explainer), logged
to MLflow.

The package has wings, each a subpackage whose ``__init__`` says what lives there and what it
may import: `data`, `models`, `explain`, `evaluate`, `study` and `outputs` are the explanation
core (no MLflow, no Hydra); `track`, `compare` and `app` sit above it. `config` (the typed
schema), `errors`, `files` and `cache` are shared by all of them.
"""

import time

IMPORTED = time.perf_counter()  # the earliest clock of the process that xai-exp sets itself

from xai_exp.app import signals as _signals  # noqa: E402 - after the clock

_signals.install_in_worker()  # a joblib sweep's worker: from its first import, signals stop it
