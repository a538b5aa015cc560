#!/usr/bin/env bash
# Tests the Python bindings: a venv under target/, numpy + pytest + this package installed
# (pip, build isolation), pytest run against target/release/libbeit.so (BEIT_LIBRARY); then the
# wheel alone (test-wheel.sh: `pip install bindings/python` into a fresh venv, used from outside
# the repository with BEIT_LIBRARY unset). BEIT_PY_WHEEL=0 skips that part.
# Usage: bindings/python/test.sh [pytest args...]   (after cargo build --release)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
lib="$root/target/release/libbeit.so"
cli="$root/target/release/beit"
venv="$root/target/python-venv"

for f in "$lib" "$cli"; do
    if [[ ! -f "$f" ]]; then
        echo "bindings/python/test.sh: $f is missing; run 'cargo build --release --locked' first" >&2
        exit 1
    fi
done

if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check numpy pytest
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$here"

# Run from the tests folder so that the installed package (not src/) is what gets imported.
cd "$here/tests"
export BEIT_LIBRARY="$lib" BEIT_CLI="$cli"
"$venv/bin/python" -c 'import beit, sys; print("beit", beit.__file__, "libbeit", beit.version(), beit.library_path())'
case "$("$venv/bin/python" -c 'import beit; print(beit.__file__)')" in
    "$venv"/*) ;;
    *) echo "bindings/python/test.sh: beit was not imported from the venv" >&2; exit 1 ;;
esac
"$venv/bin/python" -m pytest -p no:cacheprovider -q "$@" .
if [[ "${BEIT_PY_WHEEL:-1}" != 0 ]]; then
    "$here/test-wheel.sh"
fi
