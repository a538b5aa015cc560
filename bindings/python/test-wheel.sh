#!/usr/bin/env bash
# Proves that `pip install bindings/python` gives a working package with nothing else set: a
# fresh venv in a temporary directory outside the repository, `pip install` of this directory
# (the build bundles libbeit.so: setup.py), then, from that directory and with BEIT_LIBRARY and
# LD_LIBRARY_PATH unset, `import beit`, beit.version() and an inference on the reference model
# tests/reference/mim_shared that must match transformers' stored outputs (1e-4). Also checks
# that the wheel is tagged for this platform (not py3-none-any) and that the library loaded is
# the bundled one. KEEP=1 keeps the temporary directory.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
fail() { echo "test-wheel.sh: FAIL: $*" >&2; exit 1; }

tmp="$(mktemp -d /tmp/beit-py-wheel.XXXXXX)"
if [[ "${KEEP:-0}" = 1 ]]; then echo "keeping $tmp"; else trap 'rm -rf "$tmp"' EXIT; fi
case "$tmp/" in "$root"/*) fail "the temporary directory is inside the repository" ;; esac
unset BEIT_LIBRARY BEIT_CLI LD_LIBRARY_PATH

echo "== pip install bindings/python into a fresh venv ($tmp/venv)"
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check "$here" >"$tmp/pip.log" 2>&1 \
    || { cat "$tmp/pip.log" >&2; fail "pip install bindings/python"; }

wheel_meta="$(echo "$tmp"/venv/lib/python*/site-packages/beit-*.dist-info/WHEEL)"
[[ -f "$wheel_meta" ]] || fail "no installed beit dist-info"
grep -q '^Root-Is-Purelib: false$' "$wheel_meta" || fail "the wheel claims to be pure Python: $(cat "$wheel_meta")"
tag="$(sed -n 's/^Tag: //p' "$wheel_meta")"
[[ "$tag" == py3-none-* && "$tag" != py3-none-any ]] || fail "wheel tag '$tag', want py3-none-<platform>"
echo "wheel tag $tag"

echo "== import beit outside the repository, BEIT_LIBRARY unset"
cd "$tmp"
"$py" - "$tmp/venv" "$root/tests/reference/mim_shared" <<'PY'
import json, struct, sys
from pathlib import Path

import numpy as np

import beit

venv, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
lib = Path(beit.library_path()).resolve()
assert lib.is_relative_to(venv.resolve()) and lib.name == "libbeit.so", f"loaded {lib}, not the bundled library"
assert Path(beit.__file__).resolve().is_relative_to(venv.resolve()), beit.__file__


def tensors(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    dtypes = {"F32": "<f4", "U8": "u1", "BOOL": "?"}
    return {
        k: np.frombuffer(raw[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]], dtypes[v["dtype"]]).reshape(v["shape"])
        for k, v in header.items()
        if k != "__metadata__"
    }


inputs, want = tensors(model_dir / "inputs.safetensors"), tensors(model_dir / "outputs.safetensors")
with beit.Context(threads=2, device="cpu") as ctx, beit.Model.load(ctx, model_dir) as model:
    got = model.infer(inputs["pixel_values"], bool_masked_pos=inputs["bool_masked_pos"])
for name, ref in want.items():
    assert got[name].shape == ref.shape, (name, got[name].shape, ref.shape)
    worst = float((np.abs(got[name] - ref) / np.maximum(1.0, np.abs(ref))).max())
    assert worst <= 1e-4, f"{name}: {worst:.2e} from transformers"
print("beit", beit.version(), "from", lib, "logits", got["logits"].shape)
PY

echo "== examples/train.py copied outside the repository: dataset, tokenizer, pretraining, fine-tuning, evaluation"
mkdir "$tmp/project"
cp "$here/examples/train.py" "$tmp/project/"
(cd "$tmp/project" && env -u BEIT_LIBRARY -u LD_LIBRARY_PATH "$py" train.py "$tmp/project/work") >"$tmp/train.log" 2>&1 \
    || { cat "$tmp/train.log" >&2; fail "examples/train.py"; }
cat "$tmp/train.log"
[[ $(grep -c "^pretrain step" "$tmp/train.log") == 10 && $(grep -c "^fine-tune step" "$tmp/train.log") == 10 ]] \
    || fail "examples/train.py did not run 10 pretraining and 10 fine-tuning steps"
grep -q "^top-1 " "$tmp/train.log" || fail "examples/train.py printed no evaluation"
echo "test-wheel.sh: OK"
