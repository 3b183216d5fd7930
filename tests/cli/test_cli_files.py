"""Output paths: a missing folder, a folder where a file should go, an existing file where a folder
should go, the command's own input. One line on stderr, exit 2, nothing created or lost."""
from __future__ import annotations

import shutil

import numpy as np
from _cli import assert_user_error, kiln, snapshot

SHAPES = ("--shapes", "a:1x8,b:2x1x4")


def test_engine_into_missing_folder(models, tmp_path):
    r = kiln("build", models("two"), "-o", "nodir/sub/o.kiln", "--device", "cpu", *SHAPES, cwd=tmp_path)
    assert_user_error(r, "-o", "does not exist", "mkdir -p")
    assert snapshot(tmp_path) == {}


def test_engine_or_cache_onto_a_folder_leaves_no_temp_file(models, tmp_path):
    (tmp_path / "somedir").mkdir()
    (tmp_path / "somedir" / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    r = kiln("build", models("two"), "-o", "somedir", "--device", "cpu", *SHAPES, cwd=tmp_path)
    assert_user_error(r, "-o 'somedir' is a folder")
    r = kiln("build", models("two"), "-o", "o.kiln", "--timing-cache", "somedir", "--device", "cpu", *SHAPES,
             cwd=tmp_path)
    assert_user_error(r, "'somedir' is a folder")
    assert snapshot(tmp_path) == before                     # no somedir.tmpNNNN, no o.kiln


def test_engine_onto_its_own_model(models, tmp_path):
    model = shutil.copy(models("two"), tmp_path / "m.onnx")
    before = snapshot(tmp_path)
    r = kiln("build", "m.onnx", "-o", "./m.onnx", "--device", "cpu", *SHAPES, cwd=tmp_path)
    assert_user_error(r, "input file", "destroy")
    assert snapshot(tmp_path) == before and model


def test_run_outputs_into_an_existing_file(engine, tmp_path):
    (tmp_path / "existing_file").write_text("mine")
    before = snapshot(tmp_path)
    r = kiln("run", engine, "--output-dir", "existing_file", cwd=tmp_path)
    assert_user_error(r, "--output-dir 'existing_file' is an existing file")
    assert snapshot(tmp_path) == before


def test_run_outputs_into_a_new_folder(engine, tmp_path):
    r = kiln("run", engine, "--output-dir", "out/a", "--shapes", "a:3x8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ya = np.load(tmp_path / "out" / "a" / "ya.npy")
    assert ya.shape == (3, 8) and (ya >= 0).all()


def test_bench_profile_into_missing_folder(engine, tmp_path):
    r = kiln("bench", engine, "--iterations", "1", "--export-profile", "nodir/p.json", cwd=tmp_path)
    assert_user_error(r, "--export-profile", "does not exist")
    assert snapshot(tmp_path) == {}


def test_run_refuses_a_random_input_larger_than_memory(tmp_path):
    """An engine whose input is fixed at 2**40 elements (a forged header passes the schema: the size is a
    valid int64): kiln run says the random input does not fit, instead of a MemoryError traceback."""
    import kiln as api
    from kiln.engine.format import read_engine, write_engine
    net = api.Network("big")
    x = net.add_input("x", "float32", (4,))
    net.mark_output(net.add_activation(x, "relu").output, "y")
    api.build(net, api.BuildConfig(device="cpu")).save(str(tmp_path / "small.kiln"))
    header, weights = read_engine(str(tmp_path / "small.kiln"))
    header = {k: v for k, v in header.items() if k != "weights"}
    header["plan"]["inputs"][0]["shape"] = [2 ** 40]
    header["profiles"] = []
    write_engine(str(tmp_path / "big.kiln"), header, dict(weights))
    r = kiln("run", tmp_path / "big.kiln", cwd=tmp_path)
    assert_user_error(r, "GiB of free memory")


def test_inspect_shows_an_undefined_element_type(tmp_path):
    """An ONNX value typed with a number ONNX does not define (fuzz finding: KeyError 99) is shown, not a crash."""
    import onnx
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.graph.input[0].type.tensor_type.elem_type = 99
    onnx.save(m, tmp_path / "m.onnx")
    r = kiln("inspect", tmp_path / "m.onnx", cwd=tmp_path)
    assert r.returncode == 0 and "unknown type 99" in r.stdout and "Traceback" not in r.stderr, r.stderr


def test_inspect_shows_names_that_are_not_utf8(tmp_path):
    """protobuf hands a name that is not UTF-8 over as bytes; kiln inspect shows it with \\x escapes (fuzz finding)."""
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["OUTxx"], name="n")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("OUTxx", TensorProto.FLOAT, [2])])
    data = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    (tmp_path / "m.onnx").write_bytes(data.replace(b"OUTxx", b"OUT\xff\xfe"))
    for args in (("inspect",), ("inspect", "--json")):
        r = kiln(*args, tmp_path / "m.onnx", cwd=tmp_path)
        assert r.returncode == 0 and "OUT\\xff\\xfe" in r.stdout.replace("\\\\", "\\"), r.stderr


def test_run_summarizes_complex_outputs_without_warnings():
    """A complex output (DFT) is summarized by magnitude: no ComplexWarning lines on stderr (fuzz finding)."""
    import warnings

    from kiln.runtime.inputs import summary as _summary
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        line = _summary("y", np.array([3 + 4j, 0j], np.complex64))
    assert "|z|" in line and "max 5" in line
