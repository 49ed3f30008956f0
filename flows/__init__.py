"""Prefect flows and deployments over the same stage functions DVC runs."""

import os

# Prefect with no API URL starts a temporary server per process; give it time on small machines.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
