#!/usr/bin/env bash
# The GPU check on the device machine (`make gpu-check`): install the bring-alongs once, then run
# python -m bench.gpu_check. Run from the repository root with .gpu-bringalong carried (bench/README.md).
#
#   GPU_CHECK_BUDGET  seconds for the check itself (default 270)
#   GPU_BRINGALONG    bring-along folder (default .gpu-bringalong)
#   OUT               results go to $OUT/gpu-check.{md,json} when set (the device tool's return folder),
#                     else to bench/results/
# A fairseq_fixed-*-cp312-*.whl placed in the bring-along folder is installed instead of building the
# sdist. (The wheel built there, ~22 MB, is over the 16 MB a returned file may have, so it cannot
# come back from the machine; a fresh machine builds again.)
# Extra arguments go to python -m bench.gpu_check (e.g. --sections train,eval).
set -euo pipefail
export PYTHONUNBUFFERED=1  # the device tool returns the output's tail: print as it happens
BA=${GPU_BRINGALONG:-.gpu-bringalong}
PY=${PYTHON:-python3}
t0=$(date +%s)
if $PY -c "import fairseq, faiss, trime.retrieval.torch_knn" 2>/dev/null; then
    echo "gpu_check.sh: fairseq, faiss and trime already installed"
else
    [ -d "$BA" ] || { echo "gpu_check.sh: $BA is missing: run make gpu-bringalong here and carry it" >&2; exit 2; }
    # a fairseq wheel built on an earlier machine (returned in $OUT) replaces the sdist build
    fairseq_src=$(ls "$BA"/fairseq_fixed-*-cp312-*.whl 2>/dev/null | head -1 || true)
    [ -n "$fairseq_src" ] || fairseq_src=$(ls "$BA"/fairseq_fixed-*.tar.gz)
    others=$(ls "$BA"/*.whl "$BA"/*.tar.gz | grep -v fairseq_fixed)
    # CUDA_HOME would make fairseq's setup.py compile its CUDA extensions (minutes; not used here)
    # shellcheck disable=SC2086
    env -u CUDA_HOME $PY -m pip install -q --no-cache-dir --no-index --no-deps --no-build-isolation --find-links "$BA" \
        "$fairseq_src" $others -e .
    # the autoload hook that `pip install .` places itself (editable installs skip it), as in the Makefile
    cp trime-fairseq-autoload.pth "$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
fi
setup=$(( $(date +%s) - t0 ))
echo "gpu_check.sh: set-up took ${setup} s"
out=${OUT:-bench/results}
exec $PY -m bench.gpu_check --setup-seconds "$setup" --budget-s "${GPU_CHECK_BUDGET:-270}" --out "$out/gpu-check" "$@"
