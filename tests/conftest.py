"""Settings for the whole test session, made before any test module is imported."""

import os

# tiled's client tries a failed request up to 10 times over up to 45 s (TILED_RETRY_ATTEMPTS,
# TILED_RETRY_TIMEOUT, read when tiled.client is imported): the tests that stop a tiled server
# under a writer would spend most of their time there. What beampilot does once the client gives
# up is the same either way.
os.environ.setdefault("TILED_RETRY_ATTEMPTS", "2")
