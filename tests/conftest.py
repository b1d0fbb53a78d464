import os

import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. It must be
# set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_VALIDATION0 = os.environ.get("LORI_VALIDATE", "on")


@pytest.fixture(autouse=True)
def _restore_backend_and_validation():
    """Tests may call lori_kernels.set_backend / set_validation: each test starts from the
    environment's choice again."""
    yield
    import lori_kernels.backends as B
    from lori_kernels import validation as V

    B.set_backend(None)
    if V.get_validation() != _VALIDATION0:
        V.set_validation(_VALIDATION0)


def pytest_addoption(parser):
    parser.addoption("--gpu-subset", action="store_true", default=False,
                     help="run the GPU-sized subset of the Triton tests (tests/gpu_subset.py)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu-subset"):
        from gpu_subset import select
        kept, dropped = select(items)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
