#!/usr/bin/env bash
# Chromium and its WebDriver for tests/test_app_browser.py, from Debian's packages
# (chromium, chromium-driver). Installs them when missing and apt can (root, or sudo
# without a password); otherwise says how, and the browser test skips with that message.
# Never fails `make test` by itself.
set -u
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "setup_browser: no apt-get here: install Chromium and a matching chromedriver to run the browser test" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "setup_browser: not root and no passwordless sudo: run 'sudo apt-get install chromium chromium-driver'" \
      "to run the browser test" >&2
    exit 0
  fi
fi
echo "setup_browser: installing Debian's chromium and chromium-driver for the browser test" >&2
$SUDO apt-get install -y -q chromium chromium-driver >/tmp/setup_browser.log 2>&1 \
  || { $SUDO apt-get update -q >>/tmp/setup_browser.log 2>&1 \
       && $SUDO apt-get install -y -q chromium chromium-driver >>/tmp/setup_browser.log 2>&1; } \
  || echo "setup_browser: apt-get could not install chromium chromium-driver (see /tmp/setup_browser.log);" \
          "the browser test will skip" >&2
exit 0
