# Sourced by scripts/serve and scripts/test: make .venv (Python >= 3.11) and install lossd into it.
# Usage: ensure_venv EXTRAS   e.g. ensure_venv server  or  ensure_venv dev
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LOSSD_VENV:-$ROOT/.venv}"

ensure_venv() {
  local extras="$1" python="${PYTHON:-}"
  if [ -z "$python" ]; then
    for candidate in python3.11 python3.12 python3.13 python3; do
      if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
    done
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "lossd: first run: creating $VENV; installing lossd[$extras] and its packages (torch," \
      "grpcio, ...) takes about a minute, more where torch must be downloaded" >&2
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || { echo "lossd needs Python >= 3.11 (found $("$python" --version 2>&1))" >&2; exit 1; }
    "$python" -m venv "$VENV"
  fi
  # Reinstall only when the inputs changed, so repeated runs start at once.
  local stamp="$VENV/.lossd-$extras" digest
  digest="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    echo "lossd: installing lossd[$extras] into $VENV (pinned by constraints.txt)..." >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
      -c "$ROOT/constraints.txt" -e "$ROOT[$extras]"
    echo "$digest" > "$stamp"
    echo "lossd: installed" >&2
  fi
}
