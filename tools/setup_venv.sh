#!/usr/bin/env bash
# Create or refresh .venv/ at the repository root, idempotently.
#
# A stamp file records a hash of everything that decides the environment
# (constraints.txt, pyproject.toml, this script); when it is unchanged the
# script returns at once, so `make demo` / `make test` never reinstall.
#
# Needs Python 3.12 (megatron-core >= 0.17, megatron-bridge 0.6). Looks for
# $VIGOS_PYTHON, then python3.12 on PATH, then pyenv's installed 3.12.x.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.vigos-stamp"
want="$(cat "$root/constraints.txt" "$root/pyproject.toml" "$root/tools/setup_venv.sh" | sha256sum | cut -d' ' -f1)"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

find_python() {
  local c
  for c in "${VIGOS_PYTHON:-}" python3.12; do
    [[ -n "$c" ]] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      command -v "$c"; return 0
    fi
  done
  for c in "${PYENV_ROOT:-${HOME:-/root}/.pyenv}"/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 \
           /usr/local/bin/python3.12 /usr/bin/python3.12; do
    [[ -x "$c" ]] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo "$c"; return 0; }
  done
  return 1
}

py="$(find_python)" || { echo "setup_venv: Python 3.12 not found (set VIGOS_PYTHON=/path/to/python3.12)" >&2; exit 1; }
echo "setup_venv: building $venv with $py" >&2
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c "$root/constraints.txt" -e "$root[test]"
# megatron-bridge's declared dependencies (flashinfer, wandb, ...) do not install
# on CPU machines; its model/conversion code needs only what is above.
"${pip[@]}" install --no-deps -c "$root/constraints.txt" "megatron-bridge==0.6.2"
echo "$want" > "$stamp"
echo "setup_venv: ready" >&2
