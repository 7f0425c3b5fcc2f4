#!/usr/bin/env bash
# `make test`, in three steps that keep both cores busy:
#   1. the smoke run is built once (every stage through the CLI, tests/conftest.py:build_smoke), and
#      beside it run the tests that need no smoke pipeline (`make quick`; single-threaded);
#   2. the tests that read the smoke run (`slow`), spread over two pytest processes by file
#      (pytest-xdist); they only read the shared run ($NATPRINTS_TEST_SMOKE), each writes its own
#      temporary directory;
#   3. the kill -9 and Ctrl-C tests, in a pytest process of their own: after the rest of the suite in one
#      process, the Ctrl-C'd zoo and a killed Ray instance's agents were seen to outlive them.
# Each step's pytest output is printed as it ends; the suite fails when any step does.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
pytest=".venv/bin/pytest"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
started=$SECONDS
elapsed() { awk -v what="$1" -v s="$((SECONDS - started))" 'BEGIN { printf "%s: %.1f min\n", what, s / 60 }'; }

"$pytest" -q -m 'not slow and not process_faults' -p no:cacheprovider --basetemp="$scratch/quick" \
    > "$scratch/quick.log" 2>&1 &
quick=$!
.venv/bin/python -c 'import sys; from pathlib import Path; from tests.conftest import build_smoke; build_smoke(Path(sys.argv[1]))' \
    "$scratch/smoke" > "$scratch/build.log" 2>&1
built=$?
elapsed "smoke run built"
if [ "$built" -ne 0 ]; then
    cat "$scratch/build.log"
    wait "$quick"
    exit 1
fi
NATPRINTS_TEST_SMOKE="$scratch/smoke" "$pytest" -q -m 'slow and not process_faults' -p no:cacheprovider \
    -n 2 --dist loadfile --basetemp="$scratch/slow"
slow=$?
elapsed "tests that read the smoke run done"
wait "$quick"
rest=$?
echo "--- the tests that need no smoke pipeline (run beside the build) ---"
cat "$scratch/quick.log"
[ "$slow" -eq 0 ] && [ "$rest" -eq 0 ] || exit 1
"$pytest" -q -m process_faults -p no:cacheprovider --basetemp="$scratch/faults"
faults=$?
elapsed "make test"
exit "$faults"
