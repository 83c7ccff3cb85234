"""Two more tiny checkpoint sets, with other seeds than the shared `tiny` one (which serves as the base)."""

import pytest


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    from qwen_merge_mcore.fixtures import make_tiny

    root = tmp_path_factory.mktemp("merge-inputs")
    return make_tiny(root / "a", seed=1), make_tiny(root / "b", seed=2)
