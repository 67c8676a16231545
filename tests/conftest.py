"""Shared test setup: every test runs offline and quiet (../shared/ENVIRONMENT.md)."""

import os

for name, value in {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(name, value)
