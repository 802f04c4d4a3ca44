#!/usr/bin/env bash
# Fuzzes the parsers and checks that take untrusted bytes (tests/fuzz: gguf, safetensors, request,
# chat_template, detokenizer, plugin_answers) with cargo-fuzz (libFuzzer) on the stable toolchain,
# without a sanitizer (safe Rust: what is looked for is panics, hangs, runaway memory and broken
# invariants, which the targets assert).
#
#   scripts/fuzz.sh                      # every target for 60 s
#   scripts/fuzz.sh --time 600 request   # one target for 10 minutes
#   scripts/fuzz.sh --runs 2000          # a fixed number of inputs each, from a fixed seed (CI)
#
# Each target starts from its committed seeds (tests/fuzz/seeds/TARGET) and grows a corpus in
# target/fuzz-corpus/TARGET; libFuzzer's log goes to target/fuzz-logs/TARGET.log. A crash stops the run and leaves its input in
# tests/fuzz/artifacts/TARGET/; replay it with `cargo fuzz run -s none --fuzz-dir tests/fuzz
# TARGET FILE`, fix the bug, and add the case as a unit test beside the code it broke.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

limit=(-max_total_time=60)
targets=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --time) limit=(-max_total_time="$2"); shift 2 ;;
        --runs) limit=(-runs="$2" -seed=1); shift 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(gguf safetensors request chat_template detokenizer plugin_answers)
fi

"$root/scripts/fetch-model.sh" >/dev/null
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi
cargo fuzz build --sanitizer none --fuzz-dir tests/fuzz
logs="$root/target/fuzz-logs"
mkdir -p "$logs"
for target in "${targets[@]}"; do
    corpus="$root/target/fuzz-corpus/$target"
    mkdir -p "$corpus"
    echo "fuzz.sh: $target (${limit[*]})" >&2
    # -timeout: one input may take at most 10 s; -rss_limit_mb: runaway memory is a failure;
    # -max_len: requests and chat messages need room, model headers too.
    if ! cargo fuzz run --sanitizer none --fuzz-dir tests/fuzz "$target" "$corpus" "tests/fuzz/seeds/$target" -- \
        "${limit[@]}" -timeout=10 -rss_limit_mb=4096 -max_len=16384 -print_final_stats=1 >"$logs/$target.log" 2>&1; then
        tail -n 60 "$logs/$target.log" >&2
        echo "fuzz.sh: $target FAILED (input in tests/fuzz/artifacts/$target/, log in $logs/$target.log)" >&2
        exit 1
    fi
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|stat::new_units_added)' "$logs/$target.log" | tr '\n' ' ' >&2
    echo "corpus $(ls "$corpus" | wc -l) inputs" >&2
done
echo "fuzz.sh: ${targets[*]}: no failure" >&2
