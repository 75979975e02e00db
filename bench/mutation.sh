#!/usr/bin/env bash
# Mutation testing of one module with mutmut (a development tool, not in requirements.txt:
# `pip install mutmut==3.8.1`). The run happens in a scratch copy of the working tree, so the
# mutmut config and its mutants/ folder never touch the checkout or CI.
#
#   bash bench/mutation.sh common/config.py tests/test_config.py
#
# Arguments: the file to mutate, then the test files that exercise it (mutmut runs, for each
# mutant, only those of their tests that call the mutated function). Prints mutmut's summary
# and the surviving mutants; `cd $MUT_DIR/<name> && mutmut show <mutant>` shows one diff.
# MUT_CHILDREN (default 2) bounds the parallel test processes; the run is niced. MUT_ONLY, a space-separated
# list of mutant-name globs (e.g. 'models.var.x_sample_tokens* models.var.xǁKVCacheǁ*'), runs only those mutants
# and scores only them: a large module in parts, on a loaded machine.
# MUT_MARKERS, a pytest -m expression (e.g. 'not e2e'), leaves out the tests it does not select.
set -euo pipefail
target=$1; shift
[ -f "$target" ] || { echo "bench/mutation.sh: $target is not a file" >&2; exit 2; }
[ $# -gt 0 ] || { echo "bench/mutation.sh: name the test files that exercise $target" >&2; exit 2; }
repo=$(pwd)
scratch=${MUT_DIR:-/tmp/mutmut}/$(echo "$target" | tr '/.' '__')
rm -rf "$scratch" && mkdir -p "$scratch"
# tracked and untracked-but-not-ignored files: what a commit of this tree would hold
git ls-files -co --exclude-standard -z | grep -zv '^bench/\|^docs/' | xargs -0 cp --parents -t "$scratch"
cd "$scratch"
{
  echo "[mutmut]"
  echo "source_paths ="
  for p in common models data_preprocessing *.py; do echo "    $p"; done
  echo "only_mutate = $target"
  echo "also_copy ="
  echo "    configs"
  echo "    pytest.ini"
  printf 'pytest_add_cli_args =\n    -x\n    -q\n    -p\n    no:cacheprovider\n'
  [ -z "${MUT_MARKERS:-}" ] || printf '    -m\n    %s\n' "$MUT_MARKERS"
  echo "pytest_add_cli_args_test_selection ="
  for t in "$@"; do echo "    $t"; done
  # torch is not fork-safe once it has run: fork workers from a clean server
  echo "process_isolation = forkserver"
} > setup.cfg
export VARUS_SHARED_DIR=${VARUS_SHARED_DIR:-$(dirname "$repo")/shared}
set -f  # the globs are mutmut's, not the shell's
nice -n 10 mutmut run --max-children "${MUT_CHILDREN:-2}" ${MUT_ONLY:-} > run.log 2>&1 || { tail -40 run.log; exit 1; }
tail -c 300 run.log; echo
mutmut results --all true > results.txt 2>&1 || true
MUT_ONLY=${MUT_ONLY:-} python - <<'PY'
import os
from collections import Counter
from fnmatch import fnmatch
only = os.environ["MUT_ONLY"].split()
rows = [l.strip().rsplit(": ", 1) for l in open("results.txt") if ": " in l]
rows = [(n, s) for n, s in rows if not only or any(fnmatch(n, g) for g in only)]
count = Counter(s for _, s in rows)
killed = count["killed"] + count["timeout"]
tested = sum(count.values()) - count["skipped"] - count["not checked"]
print(dict(count))
print(f"score {killed}/{tested} = {100 * killed / max(tested, 1):.1f}%")
for name, status in rows:
    if status not in ("killed", "timeout"):
        print(status, name)
PY
