"""Build hooks of the beit package: the wheel bundles this platform's libbeit.so.

`pip install bindings/python` must give a package that works with nothing else set, so the
build copies libbeit.so into the package (beit/libbeit.so, which beit._ffi loads after
$BEIT_LIBRARY) and tags the wheel for this platform (py3-none-<platform>: the library is
native, but it is loaded through ctypes, so any Python 3 will do). The library comes from:

1. $BEIT_BUILD_LIBRARY, a path to a built libbeit.so, when set (e.g. building from an sdist);
2. else the libbeit checkout this directory belongs to: `cargo build --release --locked --lib`
   there (quick when up to date), then its target/release/libbeit.so ($CARGO_TARGET_DIR is
   honoured).

Everything else (metadata, dependencies) is in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent


def built_library() -> Path:
    """The libbeit.so to bundle (see the module docstring)."""
    given = os.environ.get("BEIT_BUILD_LIBRARY")
    if given:
        path = Path(given)
        if not path.is_file():
            raise SystemExit(f"BEIT_BUILD_LIBRARY={given!r} is not a file")
        return path
    if not (CHECKOUT / "Cargo.toml").is_file():
        raise SystemExit(
            "beit: cannot bundle libbeit.so: this is not a libbeit checkout; "
            "set BEIT_BUILD_LIBRARY to a built libbeit.so"
        )
    cargo = shutil.which("cargo")
    if cargo is None:
        raise SystemExit("beit: building libbeit needs cargo (or set BEIT_BUILD_LIBRARY to a built libbeit.so)")
    subprocess.run([cargo, "build", "--release", "--locked", "--lib"], cwd=CHECKOUT, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or CHECKOUT / "target")
    if not target.is_absolute():
        target = CHECKOUT / target
    path = target / "release" / "libbeit.so"
    if not path.is_file():
        raise SystemExit(f"beit: cargo build succeeded but {path} is missing")
    return path


class BuildPyWithLibrary(build_py):
    """build_py, then libbeit.so copied into the built package."""

    def run(self) -> None:
        super().run()
        library = built_library()
        dest = Path(self.build_lib) / "beit" / "libbeit.so"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library, dest)
        print(f"beit: bundled {library} as {dest}")


class PlatformWheel(bdist_wheel):
    """A wheel for this platform only (it holds a native library), for any Python 3."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self) -> tuple[str, str, str]:
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(cmdclass={"build_py": BuildPyWithLibrary, "bdist_wheel": PlatformWheel})
