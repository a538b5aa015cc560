#!/usr/bin/env bash
# Tests the Go bindings: go vet, go test -race (against target/release/libbeit.so), and a
# build of examples/infer. Needs `cargo build --release` first. Any failure fails the script.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
for f in "$root/target/release/libbeit.so" "$root/target/release/beit"; do
    [[ -e "$f" ]] || { echo "test.sh: $f is missing: run cargo build --release in $root" >&2; exit 1; }
done
# libbeit.so's SONAME (libbeit.so.<ABI>, set by build.rs) is what the test binaries look up at run
# time; a cargo target dir has only libbeit.so, so the versioned name is a link in target/go-lib.
soname=$(readelf -d "$root/target/release/libbeit.so" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')
mkdir -p "$root/target/go-lib"
[[ -z "$soname" ]] || ln -sfn "$root/target/release/libbeit.so" "$root/target/go-lib/$soname"
export LD_LIBRARY_PATH="$root/target/go-lib:$root/target/release${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CGO_ENABLED=1
cd "$here"
echo "== gofmt"
unformatted="$("$("$GO" env GOROOT)/bin/gofmt" -l .)"
[[ -z "$unformatted" ]] || { echo "test.sh: not gofmt-formatted: $unformatted" >&2; exit 1; }
echo "== go vet"
"$GO" vet ./...
echo "== go test -race"
"$GO" test -race -count=1 ./...
echo "== build examples/infer"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$GO" build -o "$out/infer" ./examples/infer
"$out/infer" "$root/tests/reference/mim_shared"
echo "test.sh: Go bindings OK"
