"""JIT variants of the lori Triton kernels: how many a run compiles, or would compile on a GPU.

The JIT compiles one kernel per distinct specialization key: the argument types, each
integer argument's "equal to 1" / "divisible by 16" class and each pointer's 16-byte
alignment (unless the kernel lists the argument in do_not_specialize), and the constexpr
values. On a cold cache each variant is a separate 0.4-2 s sm_90 compile, so the count decides
how long a first GPU run spends compiling.

`Recorder` computes that key on every launch with Triton's own specialization function (the
one its launcher calls), through the kernels' pre-run hooks; it works under the interpreter
too, where nothing is compiled, so the count can be measured on a CPU machine. `compiled()`
reads the real per-device kernel caches (compiled kernels only).

LORI_TRITON_VARIANTS=<path> (set before lori_kernels.triton is imported) records every launch
of the process and, at exit, merges the launch keys and the compiled variants' cache keys per
kernel into <path> (JSON); the GPU check reports the counts. LORI_TRITON_VARIANTS_KEYS=0 skips
the per-launch hook (compiled variants only).
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
from collections import defaultdict

MODULES = ("random_a", "sparse_delta_fwd", "sparse_delta_bwd", "merge_delta", "batched_delta")


def _is_kernel_obj(obj) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    return isinstance(obj, (JITFunction, InterpretedFunction))


def kernels() -> dict[str, object]:
    """{"module.name": kernel} for every launchable kernel (a @triton.jit function whose name
    ends in "_kernel"; the others are device functions) of the lori Triton modules."""
    out: dict[str, object] = {}
    for m in MODULES:
        mod = importlib.import_module(f"{__package__}.{m}")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and _is_kernel_obj(obj) \
                    and getattr(obj.fn, "__module__", None) == mod.__name__:
                out[f"{m}.{name}"] = obj
    return out


def _params(k) -> list[tuple[str, bool, bool, bool]]:
    """(name, is_constexpr, specialize, specialize_alignment) per parameter of kernel k."""
    import inspect
    fn = k.fn
    sig = inspect.signature(fn)
    if hasattr(k, "params"):  # JITFunction
        return [(p.name, p.is_constexpr, not p.do_not_specialize,
                 not p.do_not_specialize_on_alignment) for p in k.params]
    kw = getattr(k, "kwargs", {})
    names = list(sig.parameters)

    def _in(lst, i, n):
        return any(x == n or x == i for x in (lst or ()))
    dns, dnsa = kw.get("do_not_specialize"), kw.get("do_not_specialize_on_alignment")
    out = []
    for i, (n, p) in enumerate(sig.parameters.items()):
        ann = p.annotation
        is_const = "constexpr" in str(ann)
        out.append((n, is_const, not _in(dns, i, n), not _in(dnsa, i, n)))
    assert len(out) == len(names)
    return out


def spec_key(k, args: tuple, kwargs: dict) -> tuple:
    """The specialization key Triton's launcher builds for this launch of kernel k."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    params = _params(k)
    vals = dict(zip([p[0] for p in params], args))
    vals.update(kwargs)
    key = []
    for name, is_const, spec, align in params:
        v = vals.get(name)
        if is_const:
            key.append(("constexpr", repr(v)))
        else:
            key.append(tuple(native_specialize_impl(BaseBackend, v, False, spec, align)))
    extra = tuple(sorted((n, repr(v)) for n, v in kwargs.items() if n not in
                         {p[0] for p in params}))
    return tuple(key) + extra


class Recorder:
    """Collects the distinct specialization keys of every lori kernel launched while installed."""

    def __init__(self):
        self.keys: dict[str, set] = defaultdict(set)
        self._hooks: list[tuple[object, object]] = []

    def install(self) -> "Recorder":
        for name, k in kernels().items():
            def hook(*args, _name=name, _k=k, **kwargs):
                self.keys[_name].add(spec_key(_k, args, kwargs))
            k.add_pre_run_hook(hook)
            self._hooks.append((k, hook))
        return self

    def remove(self) -> None:
        for k, hook in self._hooks:
            if hook in k.pre_run_hooks:
                k.pre_run_hooks.remove(hook)
        self._hooks.clear()

    def __enter__(self) -> "Recorder":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def counts(self) -> dict[str, int]:
        return {n: len(v) for n, v in sorted(self.keys.items())}

    def total(self) -> int:
        return sum(len(v) for v in self.keys.values())


def compiled_keys() -> dict[str, set]:
    """{kernel: cache keys of its compiled variants} from the JIT's per-device caches (empty
    under the interpreter, which compiles nothing)."""
    out = {}
    for name, k in kernels().items():
        caches = getattr(k, "device_caches", None)
        keys = set()
        for c in (caches or {}).values():
            keys.update(str(key) for key in c[0])
        if keys:
            out[name] = keys
    return out


def compiled() -> dict[str, int]:
    return {n: len(v) for n, v in sorted(compiled_keys().items())}


def _summary(keys: dict[str, set], comp: dict[str, set]) -> dict:
    return {"keys": {n: len(v) for n, v in sorted(keys.items())},
            "keys_total": sum(len(v) for v in keys.values()),
            "compiled": {n: len(v) for n, v in sorted(comp.items())},
            "compiled_total": sum(len(v) for v in comp.values())}


def report(rec: Recorder | None) -> dict:
    """Counts of this process: distinct launch keys (rec) and compiled variants."""
    return _summary(dict(rec.keys) if rec is not None else {}, compiled_keys())


def load(path: str) -> dict | None:
    """The counts in a LORI_TRITON_VARIANTS file (None when absent or unreadable)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return {**_summary({n: set(v) for n, v in data.get("keys", {}).items()},
                       {n: set(v) for n, v in data.get("compiled", {}).items()}),
            "processes": data.get("processes", 0)}


_env_recorder: Recorder | None = None


def install_from_env() -> None:
    """LORI_TRITON_VARIANTS=<path>: record this process's launches; at exit, merge its keys
    into <path> (a union: processes sharing Triton's on-disk cache compile a key once)."""
    global _env_recorder
    path = os.environ.get("LORI_TRITON_VARIANTS")
    if not path or _env_recorder is not None:
        return
    _env_recorder = Recorder()
    # The per-launch hook costs host time on every launch: benchmarks turn it off and count
    # only the compiled variants (read from the caches at exit, free).
    if os.environ.get("LORI_TRITON_VARIANTS_KEYS", "1") != "0":
        _env_recorder.install()

    def _write():
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        for part, new in (("keys", {n: {repr(k) for k in v}
                                    for n, v in _env_recorder.keys.items()}),
                          ("compiled", compiled_keys())):
            merged = data.setdefault(part, {})
            for n, v in new.items():
                merged[n] = sorted(set(merged.get(n, ())) | v)
        data["processes"] = data.get("processes", 0) + 1
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    atexit.register(_write)
