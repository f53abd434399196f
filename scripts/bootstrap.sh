#!/usr/bin/env bash
# Creates .venv (once) with torch, torchvision and the notebook stack, and installs devis_core
# in editable mode. Re-running is cheap: a stamp file records the pyproject.toml it was built from.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DEVIS_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.devis-stamp"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating virtual environment in $venv" >&2
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# visdom ships only an sdist whose setup.py imports pkg_resources, which setuptools 81 removed: constrain the
# isolated build environments (PIP_CONSTRAINT reaches them) while keeping the machine's own constraints.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
[ -f /etc/xdg/pip/constraints.txt ] && cat /etc/xdg/pip/constraints.txt > "$constraints"
echo "setuptools<81" >> "$constraints"
export PIP_CONSTRAINT="$constraints"
# torch and torchvision first and pinned: on the project's machines pip takes them from local disk.
"${pip[@]}" install "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$venv/bin/python" -c "import torch, torchvision" || { echo "[bootstrap] torch install failed" >&2; exit 1; }
"${pip[@]}" install -e "$root[dev]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$venv/bin/python" -c "import devis_core, papermill, pycocotools, ipywidgets, yacs, visdom, av" \
  || { echo "[bootstrap] dependency install failed" >&2; exit 1; }
"$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
echo "$want" > "$stamp"
echo "[bootstrap] environment ready: $venv" >&2
