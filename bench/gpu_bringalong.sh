#!/usr/bin/env bash
# Fill the bring-along folder for the GPU machine (`make gpu-bringalong`; run here, where pip reaches the index).
#
# The device machine (python3 3.12 with torch, transformers, numpy, scipy, tqdm, cython, regex,
# sacrebleu, scikit-learn, PyYAML; no package index) lacks fairseq-fixed and these of its and
# trime's dependencies. They travel as files in an ignored folder named in the `run` tool's
# `carry` list; bench/gpu_check.sh installs them there with one `pip install --no-index`:
#   - sdists, built there against the machine's torch: fairseq-fixed, antlr4-python3-runtime (pure Python);
#   - pure-Python wheels: hydra-core, omegaconf;
#   - compiled wheels for CPython 3.12 manylinux x86_64: bitarray, faiss-cpu (FAISS on the CPU:
#     datastore index building and the exactness check of the torch GPU search).
# faiss-gpu does not fit (see FAISS_GPU_NOTE in bench/gpu_check.py). The versions are the ones
# the project's .venv uses. Usage: bench/gpu_bringalong.sh [DEST]   (default .gpu-bringalong)
set -euo pipefail
DEST=${1:-.gpu-bringalong}
PY=${PY:-.venv/bin/python}
LIMIT_MIB=${LIMIT_MIB:-56}   # of the 64 MiB that may travel; the rest is the working tree
FAIRSEQ=fairseq-fixed==0.12.3.1
SDISTS="$FAIRSEQ antlr4-python3-runtime==4.9.3"
PURE="hydra-core==1.3.2 omegaconf==2.3.0"
COMPILED="bitarray==3.12.3 faiss-cpu==1.15.1"
PLATFORMS="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64"

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
# --no-build-isolation: pip reads the sdists' metadata with this venv's torch/cython instead of fetching build deps
$PY -m pip download -q --no-deps --no-build-isolation --no-binary :all: -d "$DEST.tmp" $SDISTS
$PY -m pip download -q --no-deps --only-binary :all: -d "$DEST.tmp" $PURE
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d "$DEST.tmp" $COMPILED
size_kib=$(du -sk "$DEST.tmp" | cut -f1)
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "gpu-bringalong: $((size_kib / 1024)) MiB is over the ${LIMIT_MIB} MiB left for bring-alongs; not installed" >&2
    exit 1
fi
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
ls -l "$DEST" | tail -n +2
echo "gpu-bringalong: $(ls "$DEST" | wc -l) files, $((size_kib / 1024)) MiB in $DEST (carry it: \"carry\": [\"$DEST\"])"
