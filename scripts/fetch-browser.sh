#!/usr/bin/env bash
# A real headless browser for the web page's tests (tests/clients/ui_check.py): Debian's Chromium
# and ChromeDriver (/usr/bin/chromium, /usr/bin/chromedriver; apt-get, as root or through sudo),
# and the Selenium client installed with pip into target/pybrowser (put it on PYTHONPATH).
# Pinned where pip is concerned; idempotent and quiet when everything is in place.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
  echo "installing Debian's chromium and chromium-driver ..." >&2
  sudo=()
  [[ "$(id -u)" -ne 0 ]] && sudo=(sudo)
  "${sudo[@]}" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium chromium-driver >&2
fi
source "$root/scripts/pip-target.sh"
pip_target "$root/target/pybrowser" selenium 4.51.0
