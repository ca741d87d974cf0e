"""xai-exp: compare image explanations (a CAM method against LIME), logged to MLflow."""

import time

IMPORTED = time.perf_counter()  # the earliest clock of the process that xai-exp sets itself

from xai_exp import signals as _signals  # noqa: E402 - after the clock

_signals.install_in_worker()  # a joblib sweep's worker: from its first import, signals stop it
