"""The build backend of pytest-ftrace: maturin's, after a check that a Rust toolchain is there.

Without `cargo` on PATH, maturin's backend downloads a whole Rust toolchain into the user's
cache (through the `puccinialin` package) without asking, and offline it fails with a network
traceback that never says Rust is needed. Building pytest-ftrace from source does need Rust;
users without it should install a wheel. So every hook first checks for cargo and, when it is
missing, stops with one line saying so; and maturin is told never to fetch a toolchain
(MATURIN_NO_INSTALL_RUST), so it does not ask for puccinialin either.
"""

from __future__ import annotations

import os
import shutil
import sys

os.environ.setdefault("MATURIN_NO_INSTALL_RUST", "1")

MESSAGE = (
    "pytest-ftrace: building from source needs a Rust toolchain, and there is no `cargo` on "
    "PATH; install Rust (rustup, or your system's rust and cargo packages) and retry, or "
    "install a prebuilt wheel instead (pip install pytest-ftrace: CPython 3.12, 3.13 and "
    "3.13t on manylinux x86_64)"
)


def _need_cargo() -> None:
    if shutil.which("cargo") is None:
        sys.stderr.write(MESSAGE + "\n")
        sys.stderr.flush()
        raise SystemExit(1)


def get_requires_for_build_wheel(config_settings=None):
    _need_cargo()
    import maturin

    return maturin.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _need_cargo()
    import maturin

    return maturin.get_requires_for_build_editable(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    _need_cargo()
    import maturin

    return maturin.get_requires_for_build_sdist(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _need_cargo()
    import maturin

    return maturin.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _need_cargo()
    import maturin

    return maturin.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _need_cargo()
    import maturin

    return maturin.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _need_cargo()
    import maturin

    return maturin.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    _need_cargo()
    import maturin

    return maturin.build_sdist(sdist_directory, config_settings)
