"""Shared fixtures for the black-box tests: paths of the binary, the source tree and shared data."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tessera():
    exe = ROOT / "build" / "tessera"
    assert exe.exists(), "build/tessera is missing: run scripts/setup.sh"
    return str(exe)


@pytest.fixture(scope="session")
def shared():
    return pathlib.Path(os.environ.get("TESSERA_SHARED", ROOT.parent / "shared")).resolve()
