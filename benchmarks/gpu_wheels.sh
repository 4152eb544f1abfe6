#!/usr/bin/env bash
# Wheels for the GPU suite, into .whl/ (git-ignored; carried to the device machine with `carry: [".whl"]`).
# The device machine has Python 3.12, torch, transformers, peft, accelerate, pandas, pyarrow, xxhash, fsspec and no
# network; this brings what our code and TRL need beyond that, at our pins (constraints.txt). antlr4-python3-runtime
# (Hydra's parser) is sdist-only: its pure-Python package is copied from .venv into .whl/site/ instead.
#   bash benchmarks/gpu_wheels.sh        then, on the device: bash benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(trl datasets dill multiprocess hydra-core omegaconf)
pin() { grep -i "^$1==" constraints.txt | head -1; }
mkdir -p .whl
for p in "${PKGS[@]}"; do
  spec=$(pin "$p"); [ -n "$spec" ] || { echo "no pin for $p in constraints.txt" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
site=$(.venv/bin/python -c 'import antlr4, os; print(os.path.dirname(os.path.dirname(antlr4.__file__)))')
rm -rf .whl/site && mkdir -p .whl/site && cp -r "$site/antlr4" .whl/site/
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .gitignore
du -sh .whl && ls .whl
