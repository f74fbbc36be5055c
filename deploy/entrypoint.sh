#!/bin/sh
# The container's start: check the settings first (a bad one stops here with its name, secrets
# masked), then run the app in place of this shell so that docker stop's SIGTERM reaches it.
set -eu
cd "$(dirname "$0")/.."
python3 -m playground settings > /dev/null
exec python3 app.py "$@"
