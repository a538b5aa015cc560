#!/usr/bin/env bash
# The C++ binding end to end: `make install` into a temporary PREFIX; copies of example/ and
# example_train/ placed outside the repository and tests/ built with CMake against it
# (find_package(beit CONFIG); example_train with the README's commands); the test built again
# with pkg-config alone (the rpath comes from beit.pc); the README's snippet extracted and built;
# all run with LD_LIBRARY_PATH unset (the test plainly, statically linked, and under valgrind);
# then scripts/check-abi. Any failure stops it with a message and exit 1.
#
#   bindings/cpp/test.sh        (KEEP=1 keeps the temporary directory; BEIT_VALGRIND=0 skips valgrind)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)

fail() { echo "bindings/cpp/test.sh: FAIL: $*" >&2; exit 1; }
step() { echo "== $*"; }

for tool in cargo cmake g++ pkg-config readelf make; do
    command -v "$tool" >/dev/null || fail "$tool not found"
done

# Every program below must find libbeit.so by its rpath alone (beit.pc's, or CMake's build rpath).
unset LD_LIBRARY_PATH
WORK=$(mktemp -d /tmp/beit-cpp.XXXXXX)
if [ "${KEEP:-0}" = 1 ]; then echo "keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi
PREFIX=$WORK/prefix

step "make install PREFIX=$PREFIX"
make --no-print-directory install PREFIX="$PREFIX" >"$WORK/install.log" 2>&1 \
    || { cat "$WORK/install.log" >&2; fail "make install"; }
ABI=$(sed -n 's/^#define BEIT_ABI_VERSION \([0-9][0-9]*\)$/\1/p' include/beit.h)
VERSION=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n1)
for f in lib/libbeit.so.$VERSION lib/libbeit.a bin/beit include/beit.h include/beit.hpp \
         lib/pkgconfig/beit.pc lib/cmake/beit/beitConfig.cmake lib/cmake/beit/beitConfigVersion.cmake; do
    [ -f "$PREFIX/$f" ] || fail "not installed: $f"
done
[ "$(readlink "$PREFIX/lib/libbeit.so.$ABI")" = "libbeit.so.$VERSION" ] || fail "lib/libbeit.so.$ABI is not a link to libbeit.so.$VERSION"
[ "$(readlink "$PREFIX/lib/libbeit.so")" = "libbeit.so.$ABI" ] || fail "lib/libbeit.so is not a link to libbeit.so.$ABI"
readelf -d "$PREFIX/lib/libbeit.so.$VERSION" | grep -q "Library soname: \[libbeit.so.$ABI\]" \
    || fail "installed library lacks SONAME libbeit.so.$ABI"
"$PREFIX/bin/beit" --version >/dev/null || fail "the installed beit tool does not run"
echo "installed: SONAME libbeit.so.$ABI, links libbeit.so -> libbeit.so.$ABI -> libbeit.so.$VERSION; bin/beit"

step "extract the snippet from bindings/cpp/README.md"
SNIPPET=$WORK/readme_snippet.cpp
awk '/<!-- snippet:/ {armed = 1; next}
     armed && /^```cpp$/ {inside = 1; next}
     inside && /^```$/ {exit}
     inside {print}' bindings/cpp/README.md >"$SNIPPET"
grep -q 'int main' "$SNIPPET" || fail "no snippet found in bindings/cpp/README.md"

step "cmake: a copy of bindings/cpp/example outside the repository"
cp -r bindings/cpp/example "$WORK/example-src"
cmake -S "$WORK/example-src" -B "$WORK/example" -DCMAKE_PREFIX_PATH="$PREFIX" \
    -DCMAKE_BUILD_TYPE=Debug >"$WORK/example.log" 2>&1 || { cat "$WORK/example.log" >&2; fail "cmake example"; }
cmake --build "$WORK/example" >>"$WORK/example.log" 2>&1 || { cat "$WORK/example.log" >&2; fail "build example"; }

step "cmake: bindings/cpp/tests (+ the README snippet)"
cmake -S bindings/cpp/tests -B "$WORK/tests" -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Debug \
    -DBEIT_README_SNIPPET="$SNIPPET" >"$WORK/tests.log" 2>&1 || { cat "$WORK/tests.log" >&2; fail "cmake tests"; }
cmake --build "$WORK/tests" >>"$WORK/tests.log" 2>&1 || { cat "$WORK/tests.log" >&2; fail "build tests"; }

step "pkg-config: g++ test_beit.cpp \$(pkg-config --cflags --libs beit)"
export PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
[ "$(pkg-config --modversion beit)" = "$VERSION" ] || fail "pkg-config --modversion beit is not $VERSION"
# shellcheck disable=SC2046
g++ -std=c++17 -Wall -Wextra -Werror -pedantic -g bindings/cpp/tests/test_beit.cpp \
    -o "$WORK/test_beit_pc" $(pkg-config --cflags --libs beit) || fail "build with pkg-config"
readelf -d "$WORK/test_beit_pc" | grep -Eq "(RPATH|RUNPATH).*\[$PREFIX/lib\]" || fail "beit.pc gave no rpath to $PREFIX/lib"
# The binary needs the SONAME, not the dev link.
readelf -d "$WORK/test_beit_pc" | grep -q "NEEDED.*\[libbeit.so.$ABI\]" || fail "test_beit_pc does not NEED libbeit.so.$ABI"

step "run example on tests/reference/cls_all_pos_cls"
"$WORK/example/beit_example" tests/reference/cls_all_pos_cls || fail "example"
step "example_train: bindings/cpp/README.md's commands, with this run's prefix and directory"
# The block after the train-example marker: install, copy example_train/ outside the
# repository, build it with CMake (find_package(beit)), run it (generated datasets,
# pretraining with the loader, fine-tuning, evaluation).
awk '/<!-- train-example:/ {armed = 1; next}
     armed && /^```sh$/ {inside = 1; next}
     inside && /^```$/ {exit}
     inside {print}' bindings/cpp/README.md >"$WORK/train_example.sh"
grep -q 'build/beit_train_example' "$WORK/train_example.sh" || fail "no example_train commands in bindings/cpp/README.md"
sed -i -e "s|\$HOME/.local|$PREFIX|g" -e "s|/tmp/beit_train|$WORK/example_train|g" "$WORK/train_example.sh"
(cd "$ROOT" && bash -e "$WORK/train_example.sh") >"$WORK/example_train.out" 2>&1 \
    || { cat "$WORK/example_train.out" >&2; fail "example_train (the README's commands)"; }
grep -q '^finetune step 10: loss' "$WORK/example_train.out" || fail "example_train did not fine-tune 10 steps"
grep '^top-1 ' "$WORK/example_train.out" || fail "example_train printed no top-1"
step "run the README snippet on tests/reference/mim_shared"
"$WORK/tests/readme_snippet" tests/reference/mim_shared || fail "README snippet"
step "run test_beit (CMake, shared)"
"$WORK/tests/test_beit" "$ROOT" || fail "test_beit"
step "run test_beit_static (CMake, libbeit.a)"
"$WORK/tests/test_beit_static" "$ROOT" | tail -n1 || fail "test_beit_static"
step "run test_training (CMake, shared: split step, parameters by name, precision)"
"$WORK/tests/test_training" "$ROOT" || fail "test_training"
step "run test_finetune (CMake, shared: fine-tuning, evaluation, segmentation against the installed beit CLI)"
"$WORK/tests/test_finetune" "$ROOT" "$PREFIX/bin/beit" || fail "test_finetune"
step "run test_beit_pc (pkg-config)"
"$WORK/test_beit_pc" "$ROOT" | tail -n1 || fail "test_beit_pc"
step "ctest"
(cd "$WORK/tests" && ctest --output-on-failure) >"$WORK/ctest.log" 2>&1 || { cat "$WORK/ctest.log" >&2; fail "ctest"; }
tail -n3 "$WORK/ctest.log"

if [ "${BEIT_VALGRIND:-1}" != 0 ]; then
    command -v valgrind >/dev/null || fail "valgrind not found (BEIT_VALGRIND=0 skips it)"
    # memcheck <program under $WORK> <args...>: any memory error or definite leak fails
    # ("possibly lost" blocks of the thread pools' threads are tolerated, as in scripts/test-c).
    memcheck() {
        local t=$1 log
        shift
        step "valgrind $t"
        log=$WORK/valgrind-$(basename "$t").log
        valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
            --show-leak-kinds=definite --log-file="$log" "$WORK/$t" "$@" >/dev/null \
            || { cat "$log" >&2; fail "$t under valgrind"; }
        grep -E "ERROR SUMMARY|definitely lost" "$log" | sed 's/^==[0-9]*== */valgrind: /'
    }
    memcheck tests/test_beit "$ROOT"
    memcheck tests/test_training "$ROOT"
    memcheck example/beit_example tests/reference/cls_all_pos_cls
    memcheck example_train/build/beit_train_example "$WORK/train-valgrind"
    # test_finetune's tests of the wrappers' own work (progress functions, exceptions, results;
    # the long runs compared with the CLI are checked by the plain run above). Valgrind hides
    # AVX-512, and the bits follow the matrix kernels the CPU features pick, so the CLI the test
    # compares with runs under valgrind too (BEIT_CLI_WRAPPER).
    export BEIT_CLI_WRAPPER="valgrind -q --error-exitcode=1"
    memcheck tests/test_finetune "$ROOT" "$PREFIX/bin/beit" progress_exceptions_and_busy step_classify \
        evaluate segmentation_progress_and_errors segmentation_evaluation_by_hand device_index
    unset BEIT_CLI_WRAPPER
fi

step "scripts/check-abi"
BEIT_LIB_DIR=target/release scripts/check-abi || fail "check-abi"
echo "bindings/cpp/test.sh: OK"
