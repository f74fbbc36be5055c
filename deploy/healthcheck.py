"""Docker's health check: the app answers its API description on the port it listens on."""

from __future__ import annotations

import os
import sys
import urllib.request

port = os.environ.get("PLAYGROUND_PORT", "7860")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/info", timeout=8) as reply:
        sys.exit(0 if reply.status == 200 else 1)
except OSError as err:
    print(f"unhealthy: {err}", file=sys.stderr)
    sys.exit(1)
