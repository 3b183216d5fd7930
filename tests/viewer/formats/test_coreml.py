"""Core ML .mlmodel files built with coremltools' protobuf spec (an independent writer of the schema)."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.viewer.formats import open_model

from .conftest import check_damaged, check_detect, check_export, edges, input_weight, node

try:   # coremltools' generated classes: an independent writer of Apple's schema
    from coremltools.proto import MIL_pb2
    from coremltools.proto import Model_pb2 as proto
except Exception as exc:   # not installed, or built against an incompatible protobuf runtime
    pytest.skip(f"coremltools' protobuf classes are unavailable ({exc})", allow_module_level=True)


def _array(feature, name, shape):
    feature.name = name
    feature.type.multiArrayType.shape.extend(shape)
    feature.type.multiArrayType.dataType = 65568   # FLOAT32


def classifier_spec():
    m = proto.Model()
    m.specificationVersion = 4
    _array(m.description.input.add(), "image", [3, 8, 8])
    out = m.description.output.add()
    out.name = "classLabel"
    out.type.stringType.SetInParent()
    _array(m.description.output.add(), "probs", [4])
    m.description.metadata.author = "kiln tests"
    nn = m.neuralNetworkClassifier
    conv = nn.layers.add()
    conv.name, conv.input[:], conv.output[:] = "conv", ["image"], ["conv_out"]
    c = conv.convolution
    c.outputChannels, c.kernelChannels, c.hasBias = 2, 3, True
    c.kernelSize.extend([3, 3])
    c.stride.extend([1, 1])
    c.valid.SetInParent()
    c.weights.floatValue.extend(np.arange(54, dtype=np.float32).tolist())
    c.bias.floatValue.extend([0.5, -0.5])
    relu = nn.layers.add()
    relu.name, relu.input[:], relu.output[:] = "relu", ["conv_out"], ["relu_out"]
    relu.activation.leakyReLU.alpha = 0.25
    flat = nn.layers.add()
    flat.name, flat.input[:], flat.output[:] = "flatten", ["relu_out"], ["flat_out"]
    flat.flatten.mode = 0
    fc = nn.layers.add()
    fc.name, fc.input[:], fc.output[:] = "fc", ["flat_out"], ["logits"]
    fc.innerProduct.inputChannels, fc.innerProduct.outputChannels = 72, 4
    fc.innerProduct.weights.float16Value = np.ones((4, 72), np.float16).tobytes()
    sm = nn.layers.add()
    sm.name, sm.input[:], sm.output[:] = "softmax", ["logits"], ["probs"]
    sm.softmax.SetInParent()
    nn.stringClassLabels.vector.extend(["a", "b", "c", "d"])
    return m


def pipeline_spec():
    m = proto.Model()
    m.specificationVersion = 4
    _array(m.description.input.add(), "x", [4])
    _array(m.description.output.add(), "z", [4])
    for i, (src, dst) in enumerate((("x", "y"), ("y", "z"))):
        sub = m.pipeline.models.add()
        sub.specificationVersion = 4
        _array(sub.description.input.add(), src, [4])
        _array(sub.description.output.add(), dst, [4])
        layer = sub.neuralNetwork.layers.add()
        layer.name, layer.input[:], layer.output[:] = f"act{i}", [src], [dst]
        layer.activation.ReLU.SetInParent() if i == 0 else layer.activation.sigmoid.SetInParent()
    m.pipeline.names.extend(["first", "second"])
    return m


def program_spec():
    m = proto.Model()
    m.specificationVersion = 7
    _array(m.description.input.add(), "x", [1, 4])
    _array(m.description.output.add(), "y", [1, 4])
    fn = m.mlProgram.functions["main"]
    fn.opset = "CoreML7"
    inp = fn.inputs.add()
    inp.name = "x"
    inp.type.tensorType.dataType = MIL_pb2.FLOAT32
    for d in (1, 4):
        inp.type.tensorType.dimensions.add().constant.size = d
    block = fn.block_specializations["CoreML7"]
    block.outputs.append("y")
    const = block.operations.add()
    const.type = "const"
    out = const.outputs.add()
    out.name = "w"
    out.type.tensorType.dataType = MIL_pb2.FLOAT32
    out.type.tensorType.dimensions.add().constant.size = 4
    const.attributes["val"].immediateValue.tensor.floats.values.extend([1, 2, 3, 4])
    add = block.operations.add()
    add.type = "add"
    add.inputs["x"].arguments.add().name = "x"
    add.inputs["y"].arguments.add().name = "w"
    add.outputs.add().name = "s"
    relu = block.operations.add()
    relu.type = "relu"
    relu.inputs["x"].arguments.add().name = "s"
    relu.outputs.add().name = "y"
    return m


@pytest.fixture
def classifier(tmp_path):
    p = tmp_path / "classifier.mlmodel"
    p.write_bytes(classifier_spec().SerializeToString())
    return p


def test_neural_network_classifier(classifier):
    model = open_model(classifier)
    g = model.graph
    assert model.format == "Core ML" and model.properties["model_type"] == "neuralNetworkClassifier"
    assert model.properties["class_labels"] == ["a", "b", "c", "d"] and model.producer == "kiln tests"
    assert [n.op_type for n in g.nodes] == ["Convolution", "Activation", "Flatten", "InnerProduct", "Softmax"]
    assert edges(g) == {("conv", "relu"), ("relu", "flatten"), ("flatten", "fc"), ("fc", "softmax")}
    conv = node(g, "conv")
    assert conv.category == "conv" and conv.attributes["padding"] == "valid" and conv.attributes["kernelSize"] == [3, 3]
    w = input_weight(g, conv, "weights")
    assert w.shape == [2, 3, 3, 3] and w.load()[1, 2, 2, 2] == 53
    assert node(g, "relu").attributes == {"type": "leakyReLU", "alpha": 0.25}
    fcw = input_weight(g, node(g, "fc"), "weights")
    assert fcw.dtype == "float16" and fcw.shape == [4, 72] and fcw.load()[3, 71] == 1
    assert g.inputs[0].name == "image" and g.inputs[0].shape == [3, 8, 8] and g.inputs[0].dtype == "float32"
    assert [t.name for t in g.outputs] == ["classLabel", "probs"]


def test_pipeline_groups(tmp_path):
    p = tmp_path / "pipe.mlmodel"
    p.write_bytes(pipeline_spec().SerializeToString())
    g = open_model(p).graph
    assert [(n.name, n.group) for n in g.nodes] == [("act0", ("first",)), ("act1", ("second",))]
    assert edges(g) == {("act0", "act1")}
    assert node(g, "act1").attributes["type"] == "sigmoid"


def test_ml_program(tmp_path):
    p = tmp_path / "prog.mlmodel"
    p.write_bytes(program_spec().SerializeToString())
    model = open_model(p)
    g = model.graph
    assert model.properties["model_type"] == "mlProgram"
    assert [n.op_type for n in g.nodes] == ["add", "relu"] and edges(g) == {("s", "y")}
    assert g.weights["w"].load().tolist() == [1, 2, 3, 4]
    assert g.tensors["x"].shape == [1, 4]


def test_detect_damage_export(classifier, tmp_path):
    check_detect(classifier, tmp_path, "Core ML", ".onnx")
    check_damaged(classifier, tmp_path, magic_len=2, cuts=(0.5, 7))
    check_export(open_model(classifier), tmp_path)


def test_ml_package_with_blob_weights(tmp_path):
    """An .mlpackage laid out by coremltools' own ModelPackage, weights written by its MIL blob writer."""
    storage = pytest.importorskip("coremltools.libmilstoragepython")
    package = pytest.importorskip("coremltools.libmodelpackage")
    w32 = np.linspace(-2, 2, 12, dtype=np.float32)
    w16 = np.arange(4, dtype=np.float16)
    (tmp_path / "weights").mkdir()
    writer = storage._BlobStorageWriter(str(tmp_path / "weights" / "weight.bin"))
    offsets = [writer.write_float_data(w32), writer.write_fp16_data(w16.view(np.uint16))]
    del writer                                                      # flushes the file
    spec = program_spec()
    block = spec.mlProgram.functions["main"].block_specializations["CoreML7"]
    for (name, arr, dtype), offset in zip((("w", w32, MIL_pb2.FLOAT32), ("h", w16, MIL_pb2.FLOAT16)), offsets):
        const = block.operations[0] if name == "w" else block.operations.add()
        if name == "h":
            const.type = "const"
            const.outputs.add().name = "h"
        out = const.outputs[0].type.tensorType
        out.dataType = dtype
        del out.dimensions[:]
        out.dimensions.add().constant.size = arr.size
        val = const.attributes["val"]
        val.ClearField("immediateValue")
        val.blobFileValue.fileName = "@model_path/weights/weight.bin"
        val.blobFileValue.offset = offset
    (tmp_path / "model.mlmodel").write_bytes(spec.SerializeToString())
    pkg = package.ModelPackage(str(tmp_path / "net.mlpackage"))
    pkg.setRootModel(str(tmp_path / "model.mlmodel"), "model.mlmodel", "com.apple.CoreML", "CoreML Model Specification")
    pkg.addItem(str(tmp_path / "weights"), "weights", "com.apple.CoreML", "CoreML Model Weights")
    del pkg
    for opened in ("net.mlpackage", "net.mlpackage/Manifest.json"):
        model = open_model(tmp_path / opened)
        assert model.format == "Core ML" and model.warnings == [] and model.properties["model_type"] == "mlProgram"
        assert [n.op_type for n in model.graph.nodes] == ["add", "relu"]
        np.testing.assert_array_equal(model.graph.weights["w"].load(), w32)
        h = model.graph.weights["h"].load()
        assert h.dtype == np.float16 and h.tolist() == w16.tolist()
    check_export(open_model(tmp_path / "net.mlpackage"), tmp_path)


@pytest.fixture(scope="module")
def converted_fp16(tmp_path_factory):
    """An .mlpackage made by coremltools' own converter with FP16 compute precision (its default for ML Programs)."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 4, 4))])
    def prog(x):
        x = mb.relu(x=x, name="pre")
        x = mb.batch_norm(x=x, mean=np.array([0.5, -1, 2], np.float32), variance=np.ones(3, np.float32),
                          gamma=np.full(3, 2.0, np.float32), beta=np.full(3, 0.25, np.float32), epsilon=0.001,
                          name="bn")
        return mb.relu(x=x, name="out")
    out = tmp_path_factory.mktemp("ct") / "bn.mlpackage"
    ct.convert(prog, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
               minimum_deployment_target=ct.target.iOS16).save(str(out))
    return out


def test_fp16_constants_of_a_converted_package(converted_fp16):
    """FP16 constants are stored as raw bytes; epsilon 0.001 must read as 0.001, not as its first byte (25)."""
    model = open_model(converted_fp16)
    g = model.graph
    assert model.format == "Core ML" and model.properties["model_type"] == "mlProgram" and model.warnings == []
    bn = next(n for n in g.nodes if n.op_type == "batch_norm")
    eps = input_weight(g, bn, "epsilon")
    value = eps.load()
    assert eps.dtype == "float16" and value.dtype == np.float16 and value.size == 1
    assert float(value.ravel()[0]) == float(np.float16(0.001))
    assert input_weight(g, bn, "mean").load().tolist() == [0.5, -1, 2]
    assert [n.op_type for n in g.nodes].count("relu") == 2
    assert open_model(converted_fp16 / "Manifest.json").graph.nodes[0].op_type == g.nodes[0].op_type


def test_converted_neural_network(tmp_path):
    """A NeuralNetwork .mlmodel written by coremltools' converter (not by hand): layers and weights."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 8, 8))])
    def prog(x):
        x = mb.conv(x=x, weight=np.arange(54, dtype=np.float32).reshape(2, 3, 3, 3), name="conv")
        return mb.reduce_mean(x=mb.relu(x=x, name="relu"), axes=[2, 3], name="out")
    p = tmp_path / "nn.mlmodel"
    ct.convert(prog, convert_to="neuralnetwork").save(str(p))
    model = open_model(p)
    g = model.graph
    assert model.properties["model_type"] == "neuralNetwork"
    assert [n.op_type for n in g.nodes] == ["Convolution", "Activation", "ReduceMean"]
    assert edges(g) == {("conv", "relu"), ("relu", "out")}
    np.testing.assert_array_equal(input_weight(g, node(g, "conv"), "weights").load(),
                                  np.arange(54, dtype=np.float32).reshape(2, 3, 3, 3))


def test_recurrent_and_custom_layer_weights(tmp_path):
    """Weights nested in recurrent layers (one LSTMWeightParams per direction) and a custom layer's list of
    weights are shown, each with its shape and values (kraken's segmentation model has both)."""
    m = proto.Model()
    m.specificationVersion = 4
    _array(m.description.input.add(), "x", [5, 1, 3, 1, 1])
    nn = m.neuralNetwork
    gn = nn.layers.add()
    gn.name, gn.input[:], gn.output[:] = "gn", ["x"], ["gn_out"]
    gn.custom.className = "groupnorm"
    for k in range(2):
        gn.custom.weights.add().floatValue.extend([k + 0.5, k - 0.5, 2.0])
    lstm = nn.layers.add()
    lstm.name, lstm.input[:], lstm.output[:] = "lstm", ["gn_out"], ["y"]
    p = lstm.biDirectionalLSTM
    p.inputVectorSize, p.outputVectorSize = 3, 2
    values = {}
    for d, direction in enumerate(("forward", "backward")):
        w = p.weightParams.add()
        for g, gate in enumerate(("inputGate", "forgetGate", "blockInput", "outputGate")):
            matrix = np.arange(6, dtype=np.float32) + 10 * g + 100 * d
            getattr(w, f"{gate}WeightMatrix").floatValue.extend(matrix.tolist())
            getattr(w, f"{gate}RecursionMatrix").floatValue.extend((matrix[:4] - 1).tolist())
            getattr(w, f"{gate}BiasVector").floatValue.extend([g, d])
            values[f"{direction}/{gate}WeightMatrix"] = matrix.reshape(2, 3)
            values[f"{direction}/{gate}RecursionMatrix"] = (matrix[:4] - 1).reshape(2, 2)
    path = tmp_path / "rnn.mlmodel"
    path.write_bytes(m.SerializeToString())
    g = open_model(path).graph
    assert node(g, "gn").attributes["className"] == "groupnorm"
    assert input_weight(g, node(g, "gn"), "weights1").load().tolist() == [1.5, 0.5, 2.0]
    rnn = node(g, "lstm")
    assert len([a for a in rnn.inputs if a.values[0] in g.weights]) == 2 * 12
    for arg, want in values.items():
        np.testing.assert_array_equal(input_weight(g, rnn, arg).load(), want)
    assert input_weight(g, rnn, "backward/outputGateBiasVector").load().tolist() == [3, 1]
