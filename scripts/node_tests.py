"""Run ONNX backend node test cases through Kiln on CPU and print pass/fail per case.

A quick loop for op work, independent of the full conformance runner: the cases
come from ``onnx.backend.test.case.node`` (generated in memory, so the wheel's
missing ``data/node`` directory does not matter) and are compared the way
onnx's backend test compares them (shape, dtype, assert_allclose with the
case's rtol/atol, lists element by element).

    python scripts/node_tests.py 'loop|scan|^test_if'      # regex on the case name
    python scripts/node_tests.py conv -v                    # show tracebacks of failures
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
import warnings
from typing import Any

import numpy as np


class DiskCase:
    """A case stored as files (model.onnx, test_data_set_*/input_*.pb, output_*.pb), as onnx ships them."""

    def __init__(self, path: str, rtol: float = 1e-3, atol: float = 1e-7) -> None:
        import glob
        import os

        import onnx
        self.name = os.path.basename(path)
        self.model = onnx.load(os.path.join(path, "model.onnx"))
        self.rtol, self.atol = rtol, atol
        self.data_sets = []
        for d in sorted(glob.glob(os.path.join(path, "test_data_set_*"))):
            ins = [_load_pb(f) for f in sorted(glob.glob(os.path.join(d, "input_*.pb")), key=_pb_index)]
            outs = [_load_pb(f) for f in sorted(glob.glob(os.path.join(d, "output_*.pb")), key=_pb_index)]
            self.data_sets.append((ins, outs))


def _pb_index(path: str) -> int:
    return int(re.search(r"_(\d+)\.pb$", path).group(1))


def _load_pb(path: str) -> Any:
    """A TensorProto, SequenceProto or OptionalProto file as an array, a list or None."""
    import onnx
    from onnx import numpy_helper
    data = open(path, "rb").read()
    for proto_type, convert in ((onnx.TensorProto, numpy_helper.to_array), (onnx.SequenceProto, numpy_helper.to_list),
                                (onnx.OptionalProto, numpy_helper.to_optional)):
        proto = proto_type()
        try:
            proto.ParseFromString(data)
        except Exception:       # not this kind of proto
            continue
        if proto_type is onnx.TensorProto and not proto.dims and not proto.raw_data and proto.data_type == 0:
            continue
        if proto_type is onnx.SequenceProto and proto.elem_type == 0:
            continue
        return convert(proto)
    raise ValueError(f"{path} holds no tensor, sequence or optional.")


def collect(pattern: str, kinds: tuple[str, ...] = ("node",)) -> list[Any]:
    """Cases whose name matches ``pattern`` (a regex searched in the name).

    ``node`` cases are generated in memory; ``simple``, ``pytorch-converted`` and ``pytorch-operator``
    are read from the files onnx ships.
    """
    import glob
    import os

    import onnx
    rx = re.compile(pattern)
    out: list[Any] = []
    if "node" in kinds:
        from onnx.backend.test.case import node
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out += [c for c in node.collect_testcases(None) if rx.search(c.name)]
    data = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
    for kind in kinds:
        if kind == "node":
            continue
        for d in sorted(glob.glob(os.path.join(data, kind, "test_*"))):
            if rx.search(os.path.basename(d)) and os.path.exists(os.path.join(d, "model.onnx")):
                out.append(DiskCase(d))
    return out


def _array(v: Any) -> Any:
    """Cases give some values as TensorProto (types numpy lacks a literal for); make them arrays."""
    from onnx import TensorProto, numpy_helper
    if isinstance(v, TensorProto):
        return numpy_helper.to_array(v)
    if isinstance(v, (list, tuple)):
        return [_array(x) for x in v]
    return v


def _feeds(model, inputs: list[Any]) -> dict[str, Any]:
    init = {t.name for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in init]
    return dict(zip(names, [_array(v) for v in inputs]))


def _profiles(net, feeds: list[dict[str, Any]]) -> dict[str, tuple]:
    """One profile covering every data set's shape, for inputs with dynamic dims."""
    out = {}
    for t in net.inputs:
        if t.shape is None or all(isinstance(d, int) for d in t.shape):
            continue
        shapes = [np.shape(f[t.name]) for f in feeds if t.name in f and isinstance(f[t.name], np.ndarray)]
        if shapes and len({len(s) for s in shapes}) == 1:
            lo = tuple(min(s[i] for s in shapes) for i in range(len(shapes[0])))
            hi = tuple(max(s[i] for s in shapes) for i in range(len(shapes[0])))
            out[t.name] = (lo, shapes[0], hi)
    return out


def compare(ref: Any, out: Any, rtol: float, atol: float, where: str = "output") -> None:
    """Raise AssertionError unless ``out`` matches ``ref`` as onnx's backend test requires."""
    ref = _array(ref)
    if isinstance(ref, (list, tuple)):
        if not isinstance(out, (list, tuple)):
            raise AssertionError(f"{where}: expected a sequence of {len(ref)}, got {type(out).__name__}")
        if len(ref) != len(out):
            raise AssertionError(f"{where}: expected {len(ref)} elements, got {len(out)}")
        for j, (r, o) in enumerate(zip(ref, out)):
            compare(r, o, rtol, atol, f"{where}[{j}]")
        return
    if ref is None:
        if out is not None:
            raise AssertionError(f"{where}: expected an empty optional, got {type(out).__name__}")
        return
    if out is None:
        raise AssertionError(f"{where}: expected a value, got None")
    ref = np.asarray(ref)
    out = np.asarray(out)
    if out.shape != ref.shape:
        raise AssertionError(f"{where}: shape {out.shape} != expected {ref.shape}")
    if ref.dtype == object:
        np.testing.assert_array_equal(out, ref)
        return
    if out.dtype != ref.dtype:
        raise AssertionError(f"{where}: dtype {out.dtype} != expected {ref.dtype}")
    if ref.dtype.kind in "fc":
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol, err_msg=where)
    elif ref.dtype.kind in "iub":
        np.testing.assert_array_equal(out, ref, err_msg=where)
    else:       # bfloat16, float8 and friends: compare as float32
        np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=rtol, atol=atol,
                                   err_msg=where)


def run_case(case) -> None:
    """Parse, build and run one case on CPU; raise on any mismatch or error."""
    import kiln
    net = kiln.onnx.parse(case.model)
    profiles = _profiles(net, [_feeds(case.model, list(inputs)) for inputs, _ in case.data_sets])
    engine = kiln.build(net, kiln.BuildConfig(device="cpu", profiles=profiles or None))
    ctx = engine.context()
    out_names = [vi.name for vi in case.model.graph.output]
    for inputs, refs in case.data_sets:
        got = ctx.run(_feeds(case.model, list(inputs)))
        for i, (name, ref) in enumerate(zip(out_names, refs)):
            compare(ref, got[name], case.rtol, case.atol, f"output {i} ({name!r})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pattern", nargs="?", default=".", help="regex searched in case names")
    ap.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    ap.add_argument("-q", "--quiet", action="store_true", help="print failures and the summary only")
    ap.add_argument("-k", "--kinds", default="node",
                    help="comma-separated: node, simple, pytorch-converted, pytorch-operator (default node)")
    args = ap.parse_args(argv)
    cases = collect(args.pattern, tuple(args.kinds.split(",")))
    passed, failed = 0, []
    t0 = time.perf_counter()
    for case in cases:
        try:
            run_case(case)
        except Exception as exc:    # report every kind of failure, keep going
            msg = str(exc).strip().splitlines()
            line = next((m for m in msg if m.strip()), type(exc).__name__)
            failed.append(case.name)
            print(f"FAIL {case.name}: {type(exc).__name__}: {line[:300]}")
            if args.verbose:
                traceback.print_exc()
            continue
        passed += 1
        if not args.quiet:
            print(f"ok   {case.name}")
    print(f"{passed} passed, {len(failed)} failed ({time.perf_counter() - t0:.1f}s)")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
