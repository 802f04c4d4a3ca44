# Sourced by the set-up scripts: `pip_target DEST PACKAGE VERSION` installs PACKAGE==VERSION with
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
