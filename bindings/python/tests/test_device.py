"""beit.device_info(): what device="auto" picks here and the CUDA probe's findings, read through
beit_get_device_info; checked field by field against the beit CLI's own report of the same probe
(`beit info`, JSON), so a field read at the wrong offset or width shows."""

from __future__ import annotations

import json
import subprocess

import beit
from conftest import beit_cli


def test_device_info_is_the_probes_report():
    info = beit.device_info()
    cli = json.loads(subprocess.run([str(beit_cli()), "info"], check=True, capture_output=True, text=True).stdout)
    assert info.kind == cli["device"]
    assert info.cuda_usable == cli["cuda_usable"]
    assert info.kind == ("cuda" if info.cuda_usable else "cpu"), "auto picks CUDA exactly when usable"
    assert info.device_count == cli["device_count"]
    assert info.reason and cli["reason"].startswith(info.reason), (info.reason, cli["reason"])
    if cli["gpu"] is None:
        assert info.name == "cpu" and info.total_memory == 0 and info.compute_capability == (0, 0)
    else:
        assert info.name == cli["gpu"]["name"]
        assert info.total_memory == cli["gpu"]["total_memory_bytes"]
        assert "%d.%d" % info.compute_capability == cli["gpu"]["compute_capability"]
    # A second call gives the same report (the probe runs once).
    assert beit.device_info() == info
