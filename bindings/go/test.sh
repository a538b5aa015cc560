#!/usr/bin/env bash
# Tests the Go bindings: gofmt, go vet, go test -race (in-tree build, `-tags beit_intree`, against
# target/release/libbeit.so), builds of examples/infer and examples/train (run too), then
# test-outside.sh (the README's recipes for a module outside this repository, against `make
# install`). Needs `cargo build --release` first. Any failure fails the script.
# BEIT_GO_OUTSIDE=0 skips the outside-the-repo check.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
for f in "$root/target/release/libbeit.so" "$root/target/release/beit"; do
    [[ -e "$f" ]] || { echo "test.sh: $f is missing: run cargo build --release in $root" >&2; exit 1; }
done
# The test binaries look up libbeit.so's SONAME (libbeit.so.<ABI>) through the rpath that
# link_intree.go sets to target/release, where build.rs puts that link.
soname=$(readelf -d "$root/target/release/libbeit.so" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')
[[ -z "$soname" || -e "$root/target/release/$soname" ]] \
    || { echo "test.sh: target/release/$soname is missing (build.rs makes it): rebuild" >&2; exit 1; }
export CGO_ENABLED=1
cd "$here"
echo "== gofmt"
unformatted="$("$("$GO" env GOROOT)/bin/gofmt" -l .)"
[[ -z "$unformatted" ]] || { echo "test.sh: not gofmt-formatted: $unformatted" >&2; exit 1; }
echo "== go vet -tags beit_intree"
"$GO" vet -tags beit_intree ./...
echo "== go test -race -tags beit_intree"
"$GO" test -race -tags beit_intree -count=1 ./...
echo "== build examples/infer"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$GO" build -tags beit_intree -o "$out/infer" ./examples/infer
"$out/infer" "$root/tests/reference/mim_shared"
echo "== build examples/train"
"$GO" build -tags beit_intree -o "$out/train" ./examples/train
"$out/train" | tail -n1
if [[ "${BEIT_GO_OUTSIDE:-1}" != 0 ]]; then
    echo "== test-outside.sh"
    GO="$GO" "$here/test-outside.sh"
fi
echo "test.sh: Go bindings OK"
