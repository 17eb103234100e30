#!/usr/bin/env bash
# make test-browser: notebook 03 in JupyterLab and the demo's report.html in the distribution's
# Chromium, driven by Playwright (tests/test_browser.py). Chromium comes from apt (never from
# `playwright install`, which downloads a browser build); Playwright's Python package is
# installed once into .playwright/, outside the locked venv. Where Chromium cannot be had, one
# line says so and nothing fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
CHROMIUM=/usr/bin/chromium
LIB=.playwright
PINS="playwright==1.65.2 greenlet==3.5.6"  # playwright 1.65 needs only greenlet

if ! test -x "$CHROMIUM" && test "$(id -u)" = 0 && command -v apt-get >/dev/null; then
  echo "test-browser: installing Debian's chromium (log: $LIB.log)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends chromium; } > "$LIB.log" 2>&1 || true
fi
if ! test -x "$CHROMIUM"; then
  why="no $CHROMIUM"
  if test "$(id -u)" != 0; then why="$why (installing it needs root)"
  elif ! command -v apt-get >/dev/null; then why="$why (no apt-get)"
  else why="$why (apt-get could not install chromium, see $LIB.log)"; fi
  echo "test-browser: skipped: $why"
  exit 0
fi

if ! test -d "$LIB/playwright"; then
  echo "test-browser: installing $PINS into $LIB/ (log: $LIB.log)"
  rm -rf "$LIB.tmp"
  if ! "$PYTHON" -m pip install -q --no-deps --target "$LIB.tmp" $PINS >> "$LIB.log" 2>&1; then
    rm -rf "$LIB.tmp"
    echo "test-browser: failed: pip could not install $PINS (see $LIB.log)"
    exit 1
  fi
  mv "$LIB.tmp" "$LIB"
fi

HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 STEERLAB_REQUIRE_BROWSER=1 PYTHONPATH="$LIB" \
  "$PYTHON" -m pytest -q -s -p no:randomly tests/test_browser.py
