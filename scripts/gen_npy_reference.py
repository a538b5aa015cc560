"""Writes the tiny NumPy reference files of tests/reference_npy/ (checked by
tests/import_formats.rs), so the .npy importer is tested against real NumPy output, not only
against the test's own writer. Run with any Python that has NumPy:

    python scripts/gen_npy_reference.py

Pixel formula (the test recomputes it): value(i, j) = (i * 37 + j * 11) % 256 for sample i and
flat element j of that sample ([H, W] or [H, W, C], C order).
"""

import os

import numpy as np

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference_npy")
os.makedirs(out, exist_ok=True)


def pattern(shape):
    n = shape[0]
    per = int(np.prod(shape[1:]))
    i = np.arange(n)[:, None]
    j = np.arange(per)[None, :]
    return ((i * 37 + j * 11) % 256).reshape(shape)


# u8 grey [3, 4, 5], format version 1.0 (np.save's default).
np.save(os.path.join(out, "grey_u8.npy"), pattern((3, 4, 5)).astype(np.uint8))
# u8 RGB [2, 3, 4, 3], written as format version 2.0.
with open(os.path.join(out, "rgb_u8_v2.npy"), "wb") as f:
    np.lib.format.write_array(f, pattern((2, 3, 4, 3)).astype(np.uint8), version=(2, 0))
# float32 grey [3, 4, 5] = value / 255 (so round(x * 255) gives the pattern back).
np.save(os.path.join(out, "grey_f32.npy"), (pattern((3, 4, 5)) / 255.0).astype(np.float32))
# float64 big-endian, version 3.0.
with open(os.path.join(out, "grey_f64be_v3.npy"), "wb") as f:
    np.lib.format.write_array(f, (pattern((3, 4, 5)) / 255.0).astype(">f8"), version=(3, 0))
# Labels for 3 samples: int64 (np.save of a Python int list), uint8, big-endian int32.
np.save(os.path.join(out, "labels_i8.npy"), np.array([7, 0, 4000000000], dtype=np.int64))
np.save(os.path.join(out, "labels_u1.npy"), np.array([2, 1, 0], dtype=np.uint8))
np.save(os.path.join(out, "labels_i4be.npy"), np.array([5, 6, 7], dtype=">i4"))
# Must be rejected: Fortran order, a negative label, a bool dtype.
np.save(os.path.join(out, "fortran_u8.npy"), np.asfortranarray(pattern((3, 4, 5)).astype(np.uint8)))
np.save(os.path.join(out, "labels_negative.npy"), np.array([1, -1, 2], dtype=np.int16))
np.save(os.path.join(out, "bool_images.npy"), np.zeros((3, 4, 5), dtype=bool))
print("wrote", sorted(os.listdir(out)))
