#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time (FUZZ_SECONDS in total, default 60) on the
# stable toolchain: libFuzzer with coverage instrumentation but no sanitizer (`--sanitizer none`; the
# sanitizers need nightly). Each run starts from the committed seeds in fuzz/seeds/<target> plus whatever
# corpus earlier runs left in fuzz/corpus/<target>. A crash fails the script and leaves the input in
# fuzz/artifacts/<target>/; replay it with `cargo fuzz run --fuzz-dir fuzz --sanitizer none -O <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."
total="${FUZZ_SECONDS:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
targets=$(cargo fuzz list --fuzz-dir fuzz)
count=$(echo "$targets" | wc -w)
per=$(( total / count )); [ "$per" -ge 1 ] || per=1
for t in $targets; do
  mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
  echo "fuzz.sh: $t for ${per}s"
  set +e
  cargo fuzz run --fuzz-dir fuzz --sanitizer none -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -max_total_time="$per" -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
    | grep -Ev '^#[0-9]+|^"|Uses: '
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    if compgen -G "fuzz/artifacts/$t/*" >/dev/null; then
      echo "fuzz.sh: target $t failed (exit $status); the input is in fuzz/artifacts/$t/" >&2
    else
      echo "fuzz.sh: target $t failed (exit $status) without a crash input: the fuzz target did not build or run (see above)" >&2
    fi
    exit 1
  fi
done
echo "fuzz.sh: all targets ran ${per}s each without a crash"
