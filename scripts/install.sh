#!/usr/bin/env bash
# Creates .venv and installs imgcls into it with the given extras (default: dev).
# Uses uv for speed; uv does not read pip's configuration, so the constraint file,
# find-links folders and file:// indexes that pip is set up with are passed on to it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check uv

uv_args=()
while IFS= read -r arg; do uv_args+=("$arg"); done < <(.venv/bin/python - <<'PY'
import os, subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
cfg = {}
for line in out.splitlines():  # e.g. global.find-links='/opt/wheels'
    key, _, value = line.partition("=")
    cfg.setdefault(key.rsplit(".", 1)[-1], []).extend(value.strip("'\"").split())
local = lambda v: v[len("file://"):] if v.startswith("file://") else v
for c in cfg.get("constraint", []):
    if os.path.isfile(c):
        print("--constraint"); print(c)
for d in cfg.get("find-links", []):
    if os.path.isdir(local(d)):
        print("--find-links"); print(d)
indexes = [u for u in cfg.get("extra-index-url", []) + cfg.get("index-url", [])
           if not u.startswith("file://") or os.path.isdir(local(u))]
for u in indexes:
    print("--extra-index-url" if u.startswith("file://") else "--index-url"); print(u)
if any(u.startswith("file://") for u in indexes):
    print("--index-strategy"); print("unsafe-best-match")
PY
)
# constraints.txt: the exact versions imgcls is tested with. --compile-bytecode: uv leaves
# packages uncompiled, and where PYTHONDONTWRITEBYTECODE is set (as in some CI images)
# every process would compile torch, Ray and pandas again on import: imgcls.training.trainer took
# 14 s to import on 2 cores without .pyc files and 6 s with them, and a job starts
# several such processes (Ray Train's controller and workers, Ray Data's actors).
VIRTUAL_ENV="$PWD/.venv" .venv/bin/uv pip install --python .venv/bin/python --constraint constraints.txt \
  --compile-bytecode "${uv_args[@]}" -e ".[${extras}]"

# The pages' tests (tests/integration/test_pages.py, the try page's in test_serve.py) drive
# a real headless Chromium through chromium-driver, from the system's packages: installed
# here with the dev extra when missing (CI runs as root; elsewhere through sudo if it asks
# for no password). Without them those tests are skipped, and say why.
if [[ ",${extras}," == *",dev,"* ]] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  if command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    { $sudo apt-get update -q && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
      >/dev/null || echo "scripts/install.sh: could not install chromium and chromium-driver (apt-get);" \
                         "the browser tests will be skipped" >&2
  else
    echo "scripts/install.sh: no apt-get: install Chromium and its driver (chromedriver) for the browser tests" >&2
  fi
fi
