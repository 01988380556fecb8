#!/usr/bin/env bash
# Creates (or refreshes) the project's virtualenv in .venv and installs memballoon into it.
# Sourced by scripts/memballoon and scripts/test; safe to run again: it only reinstalls when
# pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.memballoon-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    echo "memballoon: creating virtualenv in $venv" >&2
    python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "memballoon: installing Python packages into $venv (first run only)" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[test,fuzz]" >&2
    echo "$want" > "$stamp"
fi
