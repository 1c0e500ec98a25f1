#!/usr/bin/env bash
# Runs the Python tests (trainer and worker helper) in the project's virtual environment.
set -uo pipefail
cd "$(dirname "$0")"
.venv/bin/python -m pytest -q examples worker/python "$@"
rc=$?
# pytest exits 5 when it collected nothing; that is a failure of the suite, not a pass.
exit $rc
