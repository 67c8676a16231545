"""GPU checks (`scripts/test -m gpu`, run by scripts/gpu-check on a lent GPU machine): skipped
where no CUDA device is visible. They reuse the training tests' session fixtures."""

from pathlib import Path

import pytest
import torch

from tests.integration.conftest import init_model, world  # noqa: F401  (session fixtures)

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items):
    # Hooks see the whole session's items, not only this folder's: mark the GPU tests alone.
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device visible")
        for item in items:
            if Path(str(item.fspath)).is_relative_to(HERE):
                item.add_marker(skip)
