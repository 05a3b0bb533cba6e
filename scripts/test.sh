#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow and browser tests included.
# The browser test drives Debian's chromium; as root this installs it when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing Debian's chromium for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "test: chromium is missing and cannot be installed here (needs root and apt-get); the browser test will fail" >&2
  fi
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
