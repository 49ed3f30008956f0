"""Prefect flows and deployments over the same stage functions DVC runs."""

import os

# Prefect with no API URL starts a temporary server per process; give it time on small machines.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The library's progress and stage lines ("haloquant.*" loggers, haloquant/progress.py) go into the
# flow run's logs, as Prefect's own do.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "haloquant")

import logging  # noqa: E402

if logging.getLogger("haloquant").level == logging.NOTSET:
    logging.getLogger("haloquant").setLevel(logging.INFO)
