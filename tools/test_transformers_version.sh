#!/usr/bin/env bash
# Run the export tests (tests/test_export_hf.py) against another transformers version, in a venv of its own.
#   bash tools/test_transformers_version.sh [VERSION]     (default 5.17.0, the GPU machine's)
# Needs the main venv (.venv, with the test and hf extras). The new venv (.venv-transformers-VERSION) sees
# the main venv's packages after its own, so only transformers and what that version pins differently (e.g.
# huggingface_hub) are installed into it: torch is not installed twice.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-5.17.0}
venv=.venv-transformers-$version
site_of() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    echo "import site; site.addsitedir('$(site_of .venv)')" > "$(site_of "$venv")/main_venv.pth"
fi
"$venv/bin/pip" install -q "transformers==$version"
"$venv/bin/python" -c "import sys, transformers; v = transformers.__version__; print('transformers', v, 'from', transformers.__file__); sys.exit(v != '$version')"
"$venv/bin/python" -m pytest -q tests/test_export_hf.py
