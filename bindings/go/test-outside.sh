#!/usr/bin/env bash
# Proves README.md's recipe for a Go module outside this repository: `make install` into a
# temporary prefix is part of the recipe block itself; the block runs in a fresh temporary
# directory holding the README's main.go, with an environment of PATH and HOME alone (plus the
# recipe's BEIT_SRC and PREFIX; GOPROXY=off, which only forbids the network; and an empty
# GOCACHE, as on a machine that never built beit-go: Go's build cache does not notice that
# beit.pc now names another prefix, golang/go#24544, which README.md tells users), and must print
# the README's line. The program then runs again as a built binary with LD_LIBRARY_PATH unset
# (the rpath from beit.pc finds the library). Then the README's examples/train recipe runs the
# same way in another directory. Called by test.sh; KEEP=1 keeps the directory.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
fail() { echo "test-outside.sh: FAIL: $*" >&2; exit 1; }

# block MARKER LANG: the fenced block of README.md after the comment line containing MARKER.
block() {
    awk -v marker="$1" -v fence='```'"$2" '
        index($0, "<!-- " marker) == 1 {armed = 1; next}
        armed && $0 == fence {inside = 1; next}
        inside && $0 == "```" {exit}
        inside {print}' "$here/README.md"
}
recipe="$(block outside-recipe: sh)"
program="$(block outside-program: go)"
expected="$(sed -n 's/^It prints `\(.*\)`\.$/\1/p' "$here/README.md")"
[[ -n "$recipe" && -n "$program" && -n "$expected" ]] || fail "README.md lacks the recipe, the program or the line it prints"

tmp="$(mktemp -d /tmp/beit-go-outside.XXXXXX)"
if [[ "${KEEP:-0}" = 1 ]]; then echo "keeping $tmp"; else trap 'rm -rf "$tmp"' EXIT; fi
work="$tmp/hello"
mkdir -p "$work"
case "$work/" in "$root"/*) fail "the temporary directory is inside the repository" ;; esac
printf '%s\n' "$program" >"$work/main.go"

# The Go toolchain's directory stays on PATH (GO may name one that is not).
path="$(dirname "$GO"):$PATH"
run_clean() {
    (cd "$work" && env -i PATH="$path" HOME="$HOME" GOPROXY=off GOCACHE="$tmp/gocache" \
        BEIT_SRC="$root" PREFIX="$tmp/prefix" "$@")
}
echo "== the README's recipe, in $work"
out="$(run_clean bash -euo pipefail -c "$recipe" 2>"$tmp/recipe.log")" || { cat "$tmp/recipe.log" >&2; fail "the recipe"; }
echo "$out"
[[ "$(tail -n1 <<<"$out")" == "$expected" ]] || fail "the program printed '$out', README.md says '$expected'"

echo "== go build, then the binary with no LD_LIBRARY_PATH"
run_clean bash -c 'PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig" go build -o hello .' || fail "go build"
readelf -d "$work/hello" | grep -q "NEEDED.*libbeit.so" || fail "the binary does not link libbeit"
[[ "$(run_clean ./hello "$root/tests/reference/mim_shared")" == "$expected" ]] || fail "the built binary"

# The README's examples/train recipe: another fresh directory, the same clean environment and
# prefix (installed by the recipe above). Its numbers depend on the CPU's float kernels, so the
# check is on what it did: both 10th steps and a top-1 line for the 32 test images.
train_recipe="$(block outside-train: sh)"
[[ -n "$train_recipe" ]] || fail "README.md lacks the examples/train recipe"
work="$tmp/train"
mkdir -p "$work"
echo "== the README's examples/train recipe, in $work"
out="$(run_clean bash -euo pipefail -c "$train_recipe" 2>"$tmp/train.log")" || { cat "$tmp/train.log" >&2; fail "the examples/train recipe"; }
echo "$out"
grep -q '^pretrain step 10/10 loss ' <<<"$out" || fail "examples/train did not take its 10th pretraining step"
grep -q '^finetune step 10/10 loss ' <<<"$out" || fail "examples/train did not take its 10th fine-tuning step"
[[ "$(tail -n1 <<<"$out")" =~ ^top-1\ [01]\.[0-9]{3}\ \([0-9]+/32\)$ ]] || fail "examples/train did not end with its top-1 line"
echo "test-outside.sh: OK"
