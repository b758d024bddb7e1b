import pytest

from tests.csrc import host_shim


@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    """csrc/host_shim.cpp built once per session with g++ (~1 s)."""
    return host_shim.build(tmp_path_factory.mktemp("host_shim"))
