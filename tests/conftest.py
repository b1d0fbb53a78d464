import os

import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. It must be
# set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
