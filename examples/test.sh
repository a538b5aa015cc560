#!/usr/bin/env bash
# Builds the C examples against target/release (strict warnings) and runs each on real inputs:
# inference on a committed reference model, the host-driven pretraining loop (it fails unless
# the loss falls and the checkpoint resumes), and tokenizing a folder of PNG images (imported with
# `beit dataset import --format image-folder`) with a committed tokenizer, two workers all-reducing
# the split step's gradients (they must end with the weights of one trainer on the whole batch);
# then infer.c once more
# as examples/README.md says (pkg-config, against `make install`), run without LD_LIBRARY_PATH. Needs
# `cargo build --release` first; fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
lib=target/release
[[ -f $lib/libbeit.so && -x $lib/beit ]] || { echo "examples/test.sh: run cargo build --release first" >&2; exit 1; }
build=target/examples
mkdir -p "$build/lib"
# The library's SONAME (libbeit.so.<ABI>) is what the programs look up at run time.
soname=$(readelf -d "$lib/libbeit.so" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')
[[ -z "$soname" ]] || ln -sfn "$PWD/$lib/libbeit.so" "$build/lib/$soname"
for ex in infer pretrain_loop tokenize_dataset allreduce_split_step; do
    gcc -std=c11 -Wall -Wextra -Werror -O2 -Iinclude "examples/$ex.c" -o "$build/$ex" \
        -L"$lib" -Wl,-rpath,"$PWD/$build/lib" -lbeit -lpthread -lm
done

echo "== examples/infer"
"$build/infer" tests/reference/mim_shared

echo "== examples/pretrain_loop"
rm -rf "$build/pretrain" && mkdir -p "$build/pretrain"
"$build/pretrain_loop" "$build/pretrain"
[[ -s "$build/pretrain/model/model.safetensors" && -s "$build/pretrain/checkpoint.safetensors" ]] \
    || { echo "examples/test.sh: pretrain_loop wrote no model or checkpoint" >&2; exit 1; }

echo "== examples/tokenize_dataset"
folder="$build/images"
rm -rf "$folder" && mkdir -p "$folder/circles" "$folder/stripes"
python3 - "$folder" <<'PY'
# Writes a few 8x8 grey PNGs (standard library only) into two class folders.
import math, struct, sys, zlib
def png(path, rows):
    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    ihdr = struct.pack(">IIBBBBB", len(rows[0]), len(rows), 8, 0, 0, 0, 0)
    open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
for k in range(3):
    png(f"{sys.argv[1]}/circles/c{k}.png", [[255 if (x - 3.5) ** 2 + (y - 3.5) ** 2 < (2 + k) ** 2 else 0 for x in range(8)] for y in range(8)])
    png(f"{sys.argv[1]}/stripes/s{k}.png", [[255 if (x + k) % 3 == 0 else 30 for x in range(8)] for y in range(8)])
PY
"$lib/beit" dataset import --format image-folder --dir "$folder" --size 8 --channels 1 --out "$build/images.beitds" >/dev/null
"$build/tokenize_dataset" tests/reference_dvae/grad_tiny "$build/images.beitds" | tee "$build/tokens.txt"
[[ $(grep -c "^image " "$build/tokens.txt") == 6 ]] || { echo "examples/test.sh: expected 6 tokenized images" >&2; exit 1; }

echo "== examples/allreduce_split_step"
"$build/allreduce_split_step" 5
echo "== examples/infer built as examples/README.md says, against make install"
prefix="$(mktemp -d /tmp/beit-examples.XXXXXX)"
trap 'rm -rf "$prefix"' EXIT
make --no-print-directory install PREFIX="$prefix" >"$prefix.log" 2>&1 || { cat "$prefix.log" >&2; rm -f "$prefix.log"; exit 1; }
rm -f "$prefix.log"
# shellcheck disable=SC2046
(export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"; cc -std=c11 -Wall -Wextra -Werror examples/infer.c $(pkg-config --cflags --libs beit) -o "$prefix/infer")
(unset LD_LIBRARY_PATH; "$prefix/infer" tests/reference/mim_shared) >/dev/null \
    || { echo "examples/test.sh: infer built through pkg-config does not run without LD_LIBRARY_PATH" >&2; exit 1; }
echo "== examples/allreduce_split_step copied outside the repo, built and run as its header says"
mkdir "$prefix/outside"
cp examples/allreduce_split_step.c "$prefix/outside/"
# shellcheck disable=SC2046
(cd "$prefix/outside" && export PKG_CONFIG_PATH="$prefix/lib/pkgconfig" && unset LD_LIBRARY_PATH \
    && cc -std=c11 allreduce_split_step.c $(pkg-config --cflags --libs beit) -lpthread -lm && ./a.out 5) \
    || { echo "examples/test.sh: allreduce_split_step outside the repo failed" >&2; exit 1; }
echo "examples/test.sh: OK"
