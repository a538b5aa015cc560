"""Shared fixtures: the repository root, the beit CLI, a tiny safetensors reader, a context."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import beit

REPO = Path(__file__).resolve().parents[3]
REFERENCE = REPO / "tests" / "reference"

_DTYPES = {"F32": "<f4", "F64": "<f8", "I64": "<i8", "I32": "<i4", "U8": "u1", "BOOL": "?", "U16": "<u2"}


def read_safetensors(path: Path) -> dict:
    """{name: np.ndarray} of a .safetensors file (8-byte LE header length, JSON header, data)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=_DTYPES[t["dtype"]]).reshape(t["shape"]).copy()
    return out


def beit_cli() -> Path:
    """The beit CLI: $BEIT_CLI, else `beit` next to $BEIT_LIBRARY, else target/release/beit."""
    if os.environ.get("BEIT_CLI"):
        return Path(os.environ["BEIT_CLI"])
    lib = os.environ.get("BEIT_LIBRARY")
    if lib and (Path(lib).parent / "beit").is_file():
        return Path(lib).parent / "beit"
    return REPO / "target" / "release" / "beit"


@pytest.fixture(scope="session")
def ctx():
    with beit.Context(threads=2, device="cpu") as c:
        yield c


@pytest.fixture(scope="session")
def cli():
    path = beit_cli()
    if not path.is_file():
        pytest.fail(f"the beit CLI is needed at {path} (cargo build --release, or set BEIT_CLI)")
    return path
