"""xai-exp: compare image explanations (a CAM method against LIME), logged to MLflow."""

import time

IMPORTED = time.perf_counter()  # the earliest clock of the process that xai-exp sets itself
