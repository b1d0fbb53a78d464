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
    parser.addoption("--backends", default=None, metavar="NAMES",
                     help="comma-separated backends (cpu, triton, cuda): deselect the op tests "
                          "of the other backends (tests/gpu_subset.py: backend_of)")


def pytest_collection_modifyitems(config, items):
    from gpu_subset import backend_of, select
    dropped = []
    names = config.getoption("--backends")
    if names:
        want = {n.strip() for n in names.split(",") if n.strip()}
        bad = want - {"cpu", "triton", "cuda"}
        if bad:
            raise pytest.UsageError(f"--backends: unknown backend(s) {sorted(bad)}")
        kept = []
        for it in items:
            b = backend_of(it)
            (kept if b is None or b in want else dropped).append(it)
        items[:] = kept
    if config.getoption("--gpu-subset"):
        items[:], more = select(items)
        dropped += more
    if dropped:
        config.hook.pytest_deselected(items=dropped)
