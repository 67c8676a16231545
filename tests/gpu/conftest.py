"""GPU checks (`scripts/test -m gpu`, run by scripts/gpu-check on a lent GPU machine): skipped
where no CUDA device is visible. They reuse the training tests' session fixtures."""

import pytest
import torch

from tests.integration.conftest import init_model, world  # noqa: F401  (session fixtures)


def pytest_collection_modifyitems(items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device visible")
        for item in items:
            item.add_marker(skip)
