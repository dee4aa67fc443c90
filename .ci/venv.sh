#!/usr/bin/env bash
# .ci/venv.sh NAME REQUIREMENTS_FILE: create (first time) or reuse the virtualenv for NAME and print its path.
#
# The virtualenv lives outside the repository, in ${BUNDLE_VENV_CACHE:-$HOME/.cache/lung-nodule-bundle}, named
# venv-NAME-<first 16 hex of the requirements file's sha256>, so CI runs on fresh clones reuse it and any change of
# the pins builds a new one. REQUIREMENTS_FILE pins a whole dependency closure: it is installed with --no-deps (the
# file is the resolution; pip does not re-resolve it). A build that fails leaves no virtualenv behind: the
# .complete marker is written last, and a folder without it is rebuilt.
set -euo pipefail
name=${1:?usage: .ci/venv.sh NAME REQUIREMENTS_FILE}
requirements=${2:?usage: .ci/venv.sh NAME REQUIREMENTS_FILE}
cache=${BUNDLE_VENV_CACHE:-$HOME/.cache/lung-nodule-bundle}
sha=$(sha256sum "$requirements" | cut -c1-16)
venv=$cache/venv-$name-$sha
if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$requirements" >&2
    touch "$venv/.complete"
fi
echo "$venv"
