#!/usr/bin/env bash
# `make test`: the suite as two pytest processes side by side, then the process-fault tests alone.
#   1. the tests that need the smoke pipeline (`slow`), which builds it once and shares it;
#   2. every other test (`make quick`), beside it: the smoke stages leave a core idle between their
#      jobs, and these tests are single-threaded.
# Each has a temporary directory of its own; the second one's output is printed when both are done.
# 3. the kill -9 and Ctrl-C tests, in a pytest process of their own: after the rest of the suite in one
#    process, the Ctrl-C'd zoo and a killed Ray instance's agents were seen to outlive them.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
pytest=".venv/bin/pytest"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$pytest" -q -m 'not slow and not process_faults' -p no:cacheprovider --basetemp="$scratch/quick" \
    > "$scratch/quick.log" 2>&1 &
quick=$!
"$pytest" -q -m 'slow and not process_faults' -p no:cacheprovider --basetemp="$scratch/slow"
slow=$?
wait "$quick"
rest=$?
echo "--- the tests that need no smoke pipeline (run beside it) ---"
cat "$scratch/quick.log"
[ "$slow" -eq 0 ] && [ "$rest" -eq 0 ] || exit 1
"$pytest" -q -m process_faults -p no:cacheprovider --basetemp="$scratch/faults"
