"""Core ML ``.mlmodel`` and ``.mlpackage``: neural networks (plain, classifier, regressor), pipelines, ML Programs.

Field numbers come from Apple's Core ML ``Model.proto``, ``NeuralNetwork.proto``,
``FeatureTypes.proto`` and ``MIL.proto``.  Pipelines draw each stage as a group,
joined by feature names; other model kinds appear as one node each.  An ML
Program's large constants live in a blob file beside the model
(``weights/weight.bin`` in a package), read on demand by ``_mlpackage``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ViewerError
from kiln.viewer.formats import _protobuf as pb
from kiln.viewer.formats._mlpackage import Blobs, Package, package
from kiln.viewer.formats._common import GraphBuilder, bf16_to_f32, count, file_bytes
from kiln.viewer.graph import ViewModel

_FMT = "Core ML"

_MODEL_TYPES = {
    200: "pipelineClassifier", 201: "pipelineRegressor", 202: "pipeline", 300: "glmRegressor",
    301: "supportVectorRegressor", 302: "treeEnsembleRegressor", 303: "neuralNetworkRegressor",
    304: "bayesianProbitRegressor", 400: "glmClassifier", 401: "supportVectorClassifier",
    402: "treeEnsembleClassifier", 403: "neuralNetworkClassifier", 404: "kNearestNeighborsClassifier",
    500: "neuralNetwork", 501: "itemSimilarityRecommender", 502: "mlProgram", 555: "customModel",
    556: "linkedModel", 560: "classConfidenceThresholding", 600: "oneHotEncoder", 601: "imputer",
    602: "featureVectorizer", 603: "dictVectorizer", 604: "scaler", 606: "categoricalMapping", 607: "normalizer",
    609: "arrayFeatureExtractor", 610: "nonMaximumSuppression", 900: "identity", 2000: "textClassifier",
    2001: "wordTagger", 2002: "visionFeaturePrint", 2003: "soundAnalysisPreprocessing", 2004: "gazetteer",
    2005: "wordEmbedding", 2006: "audioFeaturePrint", 3000: "serializedModel",
}
_DECODED = {200: "PipelineClassifier", 201: "PipelineClassifier", 202: "Pipeline", 303: "NeuralNetwork",
            403: "NeuralNetwork", 500: "NeuralNetwork", 502: "Program"}
_LAYERS = dict(
    (int(k), v) for k, v in (p.split(":") for p in """100:convolution 120:pooling 130:activation 140:innerProduct
    150:embedding 160:batchnorm 165:mvn 170:l2normalize 175:softmax 180:lrn 190:crop 200:padding 210:upsample
    211:resizeBilinear 212:cropResize 220:unary 230:add 231:multiply 240:average 245:scale 250:bias 260:max 261:min
    270:dot 280:reduce 290:loadConstant 300:reshape 301:flatten 310:permute 320:concat 330:split 340:sequenceRepeat
    345:reorganizeData 350:slice 400:simpleRecurrent 410:gru 420:uniDirectionalLSTM 430:biDirectionalLSTM 500:custom
    600:copy 605:branch 615:loop 620:loopBreak 625:loopContinue 635:rangeStatic 640:rangeDynamic 660:clip 665:ceil
    670:floor 680:sign 685:round 700:exp2 710:sin 715:cos 720:tan 730:asin 735:acos 740:atan 750:sinh 755:cosh
    760:tanh 770:asinh 775:acosh 780:atanh 790:erf 795:gelu 815:equal 820:notEqual 825:lessThan 827:lessEqual
    830:greaterThan 832:greaterEqual 840:logicalOr 845:logicalXor 850:logicalNot 855:logicalAnd
    865:modBroadcastable 870:minBroadcastable 875:maxBroadcastable 880:addBroadcastable 885:powBroadcastable
    890:divideBroadcastable 895:floorDivBroadcastable 900:multiplyBroadcastable 905:subtractBroadcastable 920:tile
    925:stack 930:gather 935:scatter 940:gatherND 945:scatterND 950:softmaxND 952:gatherAlongAxis
    954:scatterAlongAxis 960:reverse 965:reverseSeq 975:splitND 980:concatND 985:transpose 995:sliceStatic
    1000:sliceDynamic 1005:slidingWindows 1015:topK 1020:argMin 1025:argMax 1040:embeddingND 1045:batchedMatmul
    1065:getShape 1070:loadConstantND 1080:fillLike 1085:fillStatic 1090:fillDynamic 1100:broadcastToLike
    1105:broadcastToStatic 1110:broadcastToDynamic 1120:squeeze 1125:expandDims 1130:flattenTo2D 1135:reshapeLike
    1140:reshapeStatic 1145:reshapeDynamic 1150:rankPreservingReshape 1155:constantPad 1170:randomNormalLike
    1175:randomNormalStatic 1180:randomNormalDynamic 1190:randomUniformLike 1195:randomUniformStatic
    1200:randomUniformDynamic 1210:randomBernoulliLike 1215:randomBernoulliStatic 1220:randomBernoulliDynamic
    1230:categoricalDistribution 1250:reduceL1 1255:reduceL2 1260:reduceMax 1265:reduceMin 1270:reduceSum
    1275:reduceProd 1280:reduceMean 1285:reduceLogSum 1290:reduceSumSquare 1295:reduceLogSumExp 1313:whereNonZero
    1315:matrixBandPart 1320:lowerTriangular 1325:upperTriangular 1330:whereBroadcastable 1350:layerNormalization
    1400:NonMaximumSuppression 1450:oneHot 1455:cumSum 1460:clampedReLU 1461:argSort 1465:pooling3d
    1466:globalPooling3d 1470:sliceBySize 1471:convolution3d""".split()))
_PARAM_TYPES = {100: "Convolution", 120: "Pooling", 130: "Activation", 140: "InnerProduct", 150: "Embedding",
                160: "Batchnorm", 245: "Scale", 250: "Bias", 290: "LoadConstant", 300: "Reshape", 301: "Flatten",
                320: "Concat", 400: "SimpleRecurrent", 410: "GRU", 420: "UniDirectionalLSTM", 430: "BiDirectionalLSTM",
                500: "Custom"}
_W = "WeightParams"
SCHEMA: dict[str, pb.Schema] = {
    "Model": {1: ("specificationVersion", "int"), 2: ("description", "ModelDescription"), 10: ("isUpdatable", "bool"),
              **{n: (name, _DECODED.get(n, "bytes")) for n, name in _MODEL_TYPES.items()}},
    "ModelDescription": {1: ("input", "FeatureDescription"), 10: ("output", "FeatureDescription"),
                         11: ("predictedFeatureName", "string"), 12: ("predictedProbabilitiesName", "string"),
                         13: ("state", "FeatureDescription"), 20: ("functions", "bytes"),
                         21: ("defaultFunctionName", "string"), 50: ("trainingInput", "FeatureDescription"),
                         100: ("metadata", "Metadata")},
    "FeatureDescription": {1: ("name", "string"), 2: ("shortDescription", "string"), 3: ("type", "FeatureType")},
    "FeatureType": {1: ("int64Type", "bytes"), 2: ("doubleType", "bytes"), 3: ("stringType", "bytes"),
                    4: ("imageType", "ImageFeatureType"), 5: ("multiArrayType", "ArrayFeatureType"),
                    6: ("dictionaryType", "bytes"), 7: ("sequenceType", "bytes"), 8: ("stateType", "bytes"),
                    1000: ("isOptional", "bool")},
    "ArrayFeatureType": {1: ("shape", "int"), 2: ("dataType", "enum"), 21: ("enumeratedShapes", "bytes"),
                         31: ("shapeRange", "bytes"), 41: ("intDefaultValue", "int"), 51: ("floatDefaultValue", "float"),
                         61: ("doubleDefaultValue", "double")},
    "ImageFeatureType": {1: ("width", "int"), 2: ("height", "int"), 3: ("colorSpace", "enum"),
                         21: ("enumeratedSizes", "bytes"), 31: ("imageSizeRange", "bytes")},
    "Metadata": {1: ("shortDescription", "string"), 2: ("versionString", "string"), 3: ("author", "string"),
                 4: ("license", "string"), 100: ("userDefined", "map:string:string")},
    "Pipeline": {1: ("models", "Model"), 2: ("names", "string")},
    "PipelineClassifier": {1: ("pipeline", "Pipeline")},
    "NeuralNetwork": {1: ("layers", "Layer"), 2: ("preprocessing", "bytes"), 5: ("arrayInputShapeMapping", "enum"),
                      6: ("imageInputShapeMapping", "enum"), 10: ("updateParams", "bytes"),
                      100: ("stringClassLabels", "StringVector"), 101: ("int64ClassLabels", "bytes"),
                      200: ("labelProbabilityLayerName", "string")},
    "StringVector": {1: ("vector", "string")},
    "Layer": {1: ("name", "string"), 2: ("input", "string"), 3: ("output", "string"), 4: ("inputTensor", "bytes"),
              5: ("outputTensor", "bytes"), 10: ("isUpdatable", "bool"),
              **{n: (name, _PARAM_TYPES.get(n, "bytes")) for n, name in _LAYERS.items()}},
    _W: {1: ("floatValue", "raw:float"), 2: ("float16Value", "bytes"), 30: ("rawValue", "bytes"),
         31: ("int8RawValue", "bytes"), 40: ("quantization", "bytes"), 50: ("isUpdatable", "bool")},
    "Convolution": {1: ("outputChannels", "uint"), 2: ("kernelChannels", "uint"), 10: ("nGroups", "uint"),
                    20: ("kernelSize", "uint"), 30: ("stride", "uint"), 40: ("dilationFactor", "uint"),
                    50: ("valid", "bytes"), 51: ("same", "bytes"), 60: ("isDeconvolution", "bool"),
                    70: ("hasBias", "bool"), 90: ("weights", _W), 91: ("bias", _W), 100: ("outputShape", "uint")},
    "Pooling": {1: ("type", "enum"), 10: ("kernelSize", "uint"), 20: ("stride", "uint"), 30: ("valid", "bytes"),
                31: ("same", "bytes"), 32: ("includeLastPixel", "bytes"), 50: ("avgPoolExcludePadding", "bool"),
                60: ("globalPooling", "bool")},
    "Activation": {5: ("linear", "bytes"), 10: ("ReLU", "bytes"), 15: ("leakyReLU", "Alpha"),
                   20: ("thresholdedReLU", "Alpha"), 25: ("PReLU", "bytes"), 30: ("tanh", "bytes"),
                   31: ("scaledTanh", "bytes"), 40: ("sigmoid", "bytes"), 41: ("sigmoidHard", "bytes"),
                   50: ("ELU", "Alpha"), 60: ("softsign", "bytes"), 70: ("softplus", "bytes"),
                   71: ("parametricSoftplus", "bytes")},
    "Alpha": {1: ("alpha", "float")},
    "InnerProduct": {1: ("inputChannels", "uint"), 2: ("outputChannels", "uint"), 10: ("hasBias", "bool"),
                     20: ("weights", _W), 21: ("bias", _W), 22: ("int8DynamicQuantize", "bool")},
    "Embedding": {1: ("inputDim", "uint"), 2: ("outputChannels", "uint"), 10: ("hasBias", "bool"),
                  20: ("weights", _W), 21: ("bias", _W)},
    "Batchnorm": {1: ("channels", "uint"), 5: ("computeMeanVar", "bool"), 6: ("instanceNormalization", "bool"),
                  10: ("epsilon", "float"), 15: ("gamma", _W), 16: ("beta", _W), 17: ("mean", _W),
                  18: ("variance", _W)},
    "Scale": {1: ("shapeScale", "uint"), 2: ("scale", _W), 3: ("hasBias", "bool"), 4: ("shapeBias", "uint"),
              5: ("bias", _W)},
    "Bias": {1: ("shape", "uint"), 2: ("bias", _W)},
    "LoadConstant": {1: ("shape", "uint"), 2: ("data", _W)},
    "Reshape": {1: ("targetShape", "int"), 2: ("mode", "enum")},
    "Flatten": {1: ("mode", "enum")},
    "Concat": {100: ("sequenceConcat", "bool")},
    "SimpleRecurrent": {1: ("inputVectorSize", "uint"), 2: ("outputVectorSize", "uint"), 15: ("sequenceOutput", "bool"),
                        30: ("weightMatrix", _W), 31: ("recursionMatrix", _W), 32: ("biasVector", _W),
                        100: ("reverseInput", "bool")},
    "GRU": {1: ("inputVectorSize", "uint"), 2: ("outputVectorSize", "uint"), 15: ("sequenceOutput", "bool"),
            30: ("updateGateWeightMatrix", _W), 31: ("resetGateWeightMatrix", _W), 32: ("outputGateWeightMatrix", _W),
            50: ("updateGateRecursionMatrix", _W), 51: ("resetGateRecursionMatrix", _W),
            52: ("outputGateRecursionMatrix", _W), 70: ("updateGateBiasVector", _W), 71: ("resetGateBiasVector", _W),
            72: ("outputGateBiasVector", _W), 100: ("reverseInput", "bool")},
    "UniDirectionalLSTM": {1: ("inputVectorSize", "uint"), 2: ("outputVectorSize", "uint"),
                           20: ("weightParams", "LSTMWeightParams"), 100: ("reverseInput", "bool")},
    "BiDirectionalLSTM": {1: ("inputVectorSize", "uint"), 2: ("outputVectorSize", "uint"),
                          20: ("weightParams", "LSTMWeightParams")},       # forward, then backward
    "LSTMWeightParams": {1: ("inputGateWeightMatrix", _W), 2: ("forgetGateWeightMatrix", _W),
                         3: ("blockInputWeightMatrix", _W), 4: ("outputGateWeightMatrix", _W),
                         20: ("inputGateRecursionMatrix", _W), 21: ("forgetGateRecursionMatrix", _W),
                         22: ("blockInputRecursionMatrix", _W), 23: ("outputGateRecursionMatrix", _W),
                         40: ("inputGateBiasVector", _W), 41: ("forgetGateBiasVector", _W),
                         42: ("blockInputBiasVector", _W), 43: ("outputGateBiasVector", _W),
                         60: ("inputGatePeepholeVector", _W), 61: ("forgetGatePeepholeVector", _W),
                         62: ("outputGatePeepholeVector", _W)},
    "Custom": {10: ("className", "string"), 20: ("weights", _W), 40: ("description", "string")},
    # ML Program (MIL.proto)
    "Program": {1: ("version", "int"), 2: ("functions", "map:string:Function"), 3: ("docString", "string"),
                4: ("attributes", "bytes")},
    "Function": {1: ("inputs", "NamedValueType"), 2: ("opset", "string"),
                 3: ("block_specializations", "map:string:Block"), 4: ("attributes", "bytes")},
    "Block": {1: ("inputs", "NamedValueType"), 2: ("outputs", "string"), 3: ("operations", "Operation"),
              4: ("attributes", "bytes")},
    "Operation": {1: ("type", "string"), 2: ("inputs", "map:string:Argument"), 3: ("outputs", "NamedValueType"),
                  4: ("blocks", "Block"), 5: ("attributes", "map:string:Value")},
    "Argument": {1: ("arguments", "Binding")},
    "Binding": {1: ("name", "string"), 2: ("value", "Value")},
    "NamedValueType": {1: ("name", "string"), 2: ("type", "ValueType")},
    "ValueType": {1: ("tensorType", "TensorType"), 2: ("listType", "bytes"), 3: ("tupleType", "bytes"),
                  4: ("dictionaryType", "bytes"), 5: ("stateType", "bytes")},
    "TensorType": {1: ("dataType", "enum"), 2: ("rank", "int"), 3: ("dimensions", "Dimension"),
                   4: ("attributes", "bytes")},
    "Dimension": {1: ("constant", "ConstantDimension"), 2: ("unknown", "bytes")},
    "ConstantDimension": {1: ("size", "uint")},
    "Value": {1: ("docString", "string"), 2: ("type", "ValueType"), 3: ("immediateValue", "ImmediateValue"),
              5: ("blobFileValue", "BlobFileValue")},
    "ImmediateValue": {1: ("tensor", "TensorValue"), 2: ("tuple", "bytes"), 3: ("list", "bytes"),
                       4: ("dictionary", "bytes")},
    "TensorValue": {1: ("floats", "RepeatedFloats"), 2: ("ints", "RepeatedInts"), 3: ("bools", "RepeatedInts"),
                    4: ("strings", "RepeatedStrings"), 5: ("longInts", "RepeatedInts"),
                    6: ("doubles", "RepeatedDoubles"), 7: ("bytes", "RepeatedBytes")},
    "RepeatedFloats": {1: ("values", "raw:float")},
    "RepeatedDoubles": {1: ("values", "raw:double")},
    "RepeatedInts": {1: ("values", "raw:int")},
    "RepeatedStrings": {1: ("values", "string")},
    "RepeatedBytes": {1: ("values", "bytes")},
    "BlobFileValue": {1: ("fileName", "string"), 2: ("offset", "uint")},
}
_ARRAY_TYPES = {65568: "float32", 65600: "float64", 131104: "int32", 131080: "int8", 65552: "float16"}
_MIL_TYPES = {1: "bool", 2: "string", 10: "float16", 11: "float32", 12: "float64", 13: "bfloat16", 21: "int8",
              22: "int16", 23: "int32", 24: "int64", 25: "int4", 31: "uint8", 32: "uint16", 33: "uint32",
              34: "uint64", 40: "float8e4m3fn", 41: "float8e5m2"}
# MIL types whose immediate values are raw bytes -> numpy dtype (sub-byte types stay packed bytes).
_BYTES_DTYPES = {"float16": "<f2", "bfloat16": "<u2", "int8": "i1", "uint8": "u1", "int16": "<i2", "uint16": "<u2"}
_COLORS = {10: "GRAYSCALE", 20: "RGB", 30: "BGR", 40: "GRAYSCALE_FLOAT16"}
_POOLS = ["MAX", "AVERAGE", "L2"]


def sniff(path: Path, head: bytes) -> Package | bool:
    pkg = package(path)
    if pkg is not None:
        return pkg
    if head[:1] != b"\x08":
        return False
    seen = pb.conforming_fields(head, "Model", SCHEMA, 1)
    return bool(seen and 1 in seen and (seen & set(_MODEL_TYPES) or 2 in seen))


def read(path: Path, handle: Any = None) -> ViewModel:
    shown = path
    pkg = handle if isinstance(handle, Package) else package(path)
    if pkg is not None:
        if pkg.model is None:
            raise ViewerError(pkg.error or f"{path.name!r} is not a readable {_FMT} package.")
        shown, path = pkg.folder, pkg.model
    data = file_bytes(path)
    try:
        model = pb.decode(data, "Model", SCHEMA)
    except pb.ProtoError as exc:
        raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: {exc}; it is truncated or damaged.") from None
    kind = _kind(model)
    if kind is None and not model.one("description"):
        raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: it describes no model.")
    b = GraphBuilder(shown.stem)
    graphs: list = []
    blobs = Blobs(path.parent)
    try:
        _model(b, model, (), graphs, blobs)
    except (pb.ProtoError, ValueError, TypeError) as exc:
        raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: {exc}.") from None
    desc = model.one("description", pb.Message())
    main = b.finish(inputs=[_feature(b, f) for f in desc.all("input")],
                    outputs=[_feature(b, f) for f in desc.all("output")])
    props: dict[str, Any] = {"model_type": kind}
    meta = desc.one("metadata", pb.Message())
    for key in ("shortDescription", "author", "license", "versionString"):
        if meta.one(key):
            props[key] = meta.one(key)
    props.update(meta.get("userDefined", {}) if isinstance(meta.get("userDefined"), dict) else {})
    nn = model.one(kind) if kind in ("neuralNetworkClassifier",) else None
    if nn is not None and nn.one("stringClassLabels"):
        props["class_labels"] = nn.one("stringClassLabels").all("vector")[:32]
    return ViewModel(format=_FMT, path=str(shown), producer=props.get("author"),
                     version=f"specification {model.one('specificationVersion', 0)}", properties=props,
                     graphs=[main, *graphs], file_size=len(data), warnings=blobs.warnings)


def _kind(model: pb.Message) -> str | None:
    for name in _MODEL_TYPES.values():
        if name in model:
            return name
    return None


def _feature(b: GraphBuilder, f: pb.Message) -> str:
    name = f.one("name", "")
    t = f.one("type", pb.Message())
    shape: Any = None
    dtype = None
    if t.one("multiArrayType") is not None:
        a = t.one("multiArrayType")
        shape = [int(d) for d in a.all("shape")] or None
        dtype = _ARRAY_TYPES.get(a.one("dataType", 0), "array")
    elif t.one("imageType") is not None:
        im = t.one("imageType")
        shape = [im.one("height", 0), im.one("width", 0)]
        dtype = f"image({_COLORS.get(im.one('colorSpace', 0), '?')})"
    else:
        for key, dt in (("int64Type", "int64"), ("doubleType", "float64"), ("stringType", "string"),
                        ("dictionaryType", "dictionary"), ("sequenceType", "sequence")):
            if key in t:
                dtype = dt
    return b.tensor(name, shape, dtype, doc=f.one("shortDescription") or None)


def _model(b: GraphBuilder, model: pb.Message, group: tuple[str, ...], graphs: list, blobs: Blobs) -> None:
    kind = _kind(model)
    if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
        pipe = model.one(kind)
        pipe = pipe.one("pipeline", pipe) if kind != "pipeline" else pipe
        names = pipe.all("names")
        for i, sub in enumerate(pipe.all("models")):
            _model(b, sub, (*group, names[i] if i < len(names) else f"model{i}"), graphs, blobs)
    elif kind in ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor"):
        for layer in model.one(kind).all("layers"):
            _layer(b, layer, group)
    elif kind == "mlProgram":
        _program(b, model.one(kind), group, blobs)
    else:
        desc = model.one("description", pb.Message())
        b.node(group[-1] if group else (kind or "model"), kind or "model",
               [("input", [_feature(b, f) for f in desc.all("input")])],
               [("output", [_feature(b, f) for f in desc.all("output")])], group=group[:-1] if group else ())


def _layer(b: GraphBuilder, layer: pb.Message, group: tuple[str, ...]) -> None:
    name = layer.one("name", "")
    op, params = "layer", pb.Message()
    for key in _LAYERS.values():
        if key in layer:
            op = key
            v = layer.one(key)
            params = v if isinstance(v, pb.Message) else pb.Message()
            break
    attrs: dict[str, Any] = {}
    ins: list[tuple[str, list[str]]] = [("input" if k == 0 else f"input{k}", [x]) for k, x in enumerate(layer.all("input"))]
    for key, values in params.items():
        v = values[-1] if isinstance(values, list) and values else values
        if isinstance(v, pb.Message) and _is_weight(v):
            if op == "activation":
                continue
            many = values if isinstance(values, list) else [v]          # a custom layer lists several
            for k, w in enumerate(many):
                _add_weight(b, ins, name, f"{key}{k}" if len(many) > 1 else key, key, op, params, w)
        elif key == "weightParams" and isinstance(values, list):          # LSTM: forward (and backward) gates
            for d, gates in zip(("forward", "backward") if len(values) == 2 else ("",), values):
                for gkey, gvalues in gates.items():
                    if gvalues and isinstance(gvalues[-1], pb.Message):
                        _add_weight(b, ins, name, f"{d}/{gkey}" if d else gkey, gkey, op, params, gvalues[-1])
        elif key in ("valid", "same", "includeLastPixel"):
            attrs["padding"] = key
        elif isinstance(v, pb.Message):
            continue
        else:
            attrs[key] = values if isinstance(values, list) and len(values) > 1 else v
    if op == "activation":
        for key, values in params.items():
            attrs["type"] = key
            if values and isinstance(values[-1], pb.Message) and "alpha" in values[-1]:
                attrs["alpha"] = values[-1].one("alpha")
    if op == "pooling" and isinstance(attrs.get("type"), int):
        attrs["type"] = _POOLS[attrs["type"]] if 0 <= attrs["type"] < 3 else attrs["type"]
    op_type = op[:1].upper() + op[1:]
    b.node(name, op_type, ins, [("output" if k == 0 else f"output{k}", [x]) for k, x in enumerate(layer.all("output"))],
           attrs, group=group)


def _is_weight(v: pb.Message) -> bool:
    return "floatValue" in v or "float16Value" in v or "rawValue" in v or "int8RawValue" in v or not v


def _add_weight(b: GraphBuilder, ins: list, layer: str, arg: str, key: str, op: str, params: pb.Message,
                w: pb.Message) -> None:
    """One WeightParams of a layer as the weight ``layer/arg`` feeding its input ``arg``."""
    shape = _weight_shape(op, key, params, w)
    wname = f"{layer}/{arg}"
    dtype, load = _weight_loader(w, shape)
    b.weight(wname, shape, dtype, load)
    ins.append((arg, [wname]))


def _weight_shape(op: str, key: str, p: pb.Message, w: pb.Message) -> list[int]:
    n = _weight_count(w)
    ks = [int(x) for x in p.all("kernelSize")] or [3, 3]
    shapes = {
        ("convolution", "weights"): [p.one("outputChannels", 0), p.one("kernelChannels", 0), *ks],
        ("innerProduct", "weights"): [p.one("outputChannels", 0), p.one("inputChannels", 0)],
        ("embedding", "weights"): [p.one("outputChannels", 0), p.one("inputDim", 0)],
        ("scale", "scale"): [int(x) for x in p.all("shapeScale")], ("scale", "bias"): [int(x) for x in p.all("shapeBias")],
        ("bias", "bias"): [int(x) for x in p.all("shape")], ("loadConstant", "data"): [int(x) for x in p.all("shape")],
    }
    out, inp = p.one("outputVectorSize", 0), p.one("inputVectorSize", 0)     # recurrent layers' gate matrices
    if key.lower().endswith("weightmatrix"):
        shapes[(op, key)] = [out, inp]
    elif key.lower().endswith("recursionmatrix"):
        shapes[(op, key)] = [out, out]
    if op == "convolution" and p.one("isDeconvolution") and key == "weights":
        shapes[(op, key)] = [p.one("kernelChannels", 0), p.one("outputChannels", 0) // max(1, p.one("nGroups", 1)), *ks]
    shape = shapes.get((op, key), [n])
    return shape if count(shape) == n else [n]


def _weight_count(w: pb.Message) -> int:
    if w.all("floatValue"):
        return sum(len(c) // 4 if not isinstance(c, int) else 1 for c in w.all("floatValue"))
    if w.one("float16Value") is not None:
        return len(w.one("float16Value")) // 2
    for key in ("rawValue", "int8RawValue"):
        if w.one(key) is not None:
            return len(w.one(key)) // (4 if key == "rawValue" else 1)
    return 0


def _weight_loader(w: pb.Message, shape: list[int]):
    if w.one("float16Value") is not None:
        raw, dtype = w.one("float16Value"), "float16"
    elif w.one("int8RawValue") is not None:
        raw, dtype = w.one("int8RawValue"), "int8"
    elif w.one("rawValue") is not None:
        raw, dtype = w.one("rawValue"), "float32"
    else:
        raw, dtype = None, "float32"

    def load() -> np.ndarray:
        if raw is None:
            arr = pb.raw_array(w.all("floatValue"), "float", "<f4")
        else:
            arr = np.frombuffer(bytes(raw), dtype={"float16": "<f2", "int8": "i1", "float32": "<f4"}[dtype])
        return arr.reshape(shape) if count(shape) == arr.size else arr
    return dtype, load


def _tensor_type(v: pb.Message | None) -> tuple[list | None, str | None]:
    t = v.one("tensorType") if v is not None else None
    if t is None:
        return None, None
    dims = [d.one("constant").one("size", 0) if d.one("constant") is not None else None for d in t.all("dimensions")]
    return dims, _MIL_TYPES.get(t.one("dataType", 0), f"type{t.one('dataType', 0)}")


def _program(b: GraphBuilder, prog: pb.Message, group: tuple[str, ...], blobs: Blobs) -> None:
    functions = prog.get("functions") if isinstance(prog.get("functions"), dict) else {}
    for fname, fn in functions.items():
        for inp in fn.all("inputs"):
            shape, dtype = _tensor_type(inp.one("type"))
            b.tensor(inp.one("name", ""), shape, dtype)
        blocks = fn.get("block_specializations") if isinstance(fn.get("block_specializations"), dict) else {}
        block = blocks.get(fn.one("opset", "")) or next(iter(blocks.values()), None)
        if block is None:
            continue
        fgroup = group if fname == "main" else (*group, fname)
        _block(b, block, fgroup, 0, blobs)


def _block(b: GraphBuilder, block: pb.Message, group: tuple[str, ...], depth: int, blobs: Blobs) -> None:
    if depth > 16:
        raise ValueError("ML Program blocks nest too deeply")
    for i, op in enumerate(block.all("operations")):
        op_type = op.one("type", "op")
        outs = [o.one("name", "") for o in op.all("outputs")]
        for o in op.all("outputs"):
            shape, dtype = _tensor_type(o.one("type"))
            b.tensor(o.one("name", ""), shape, dtype)
        attrs_v = op.get("attributes") if isinstance(op.get("attributes"), dict) else {}
        if op_type == "const" and outs:
            val = attrs_v.get("val")
            shape, dtype = _tensor_type(outs and op.all("outputs")[0].one("type"))
            b.weight(outs[0], [d or 0 for d in shape or []], dtype,
                     _value_loader(outs[0], val, shape, blobs) if isinstance(val, pb.Message) else None)
            continue
        ins: list[tuple[str, list[str]]] = []
        attrs: dict[str, Any] = {}
        inputs = op.get("inputs") if isinstance(op.get("inputs"), dict) else {}
        for arg, a in inputs.items():
            names = [bd.one("name") for bd in a.all("arguments") if bd.one("name")]
            values = [bd.one("value") for bd in a.all("arguments") if bd.one("value") is not None]
            if names:
                ins.append((arg, names))
            elif values:
                attrs[arg] = _small_value(values[0])
        name = attrs_v.get("name")
        node_name = _small_value(name) if name is not None else (outs[0] if outs else f"{op_type}_{i}")
        node = b.node(str(node_name), op_type, ins, [("output" if k == 0 else f"output{k}", [o])
                                                     for k, o in enumerate(outs)], attrs, group=group)
        for k, sub in enumerate(op.all("blocks")):
            inner = GraphBuilder(f"{node.name}/block{k}")
            _block(inner, sub, (), depth + 1, blobs)
            node.subgraphs[f"block{k}"] = inner.finish(outputs=list(sub.all("outputs")))


def _immediate(v: pb.Message) -> np.ndarray | None:
    imm = v.one("immediateValue")
    t = imm.one("tensor") if imm is not None else None
    if t is None:
        return None
    for key, kind, dt in (("floats", "float", "<f4"), ("doubles", "double", "<f8"), ("ints", "int", "<i8"),
                          ("longInts", "int", "<i8"), ("bools", "int", "<i8")):
        if key in t:
            arr = pb.raw_array(t.one(key).all("values"), kind, dt)
            return arr.astype(bool) if key == "bools" else arr
    if "strings" in t:
        return np.array(t.one("strings").all("values"), dtype=object)
    if "bytes" in t:   # fp16, 8-bit and sub-byte values are stored as raw bytes; the value type says which
        vals = t.one("bytes").all("values")
        _, dtype = _tensor_type(v.one("type"))
        raw = np.frombuffer(bytes(vals[0]) if vals else b"", dtype=_BYTES_DTYPES.get(dtype or "", "u1"))
        return bf16_to_f32(raw) if dtype == "bfloat16" else raw
    return None


def _small_value(v: Any) -> Any:
    if not isinstance(v, pb.Message):
        return v
    arr = _immediate(v)
    if arr is None:
        blob = v.one("blobFileValue")
        return f"{blob.one('fileName', '')}@{blob.one('offset', 0)}" if blob is not None else None
    return arr.tolist()[0] if arr.size == 1 else (arr.tolist() if arr.size <= 16 else f"{arr.size} values")


def _value_loader(name: str, v: pb.Message, shape: list | None, blobs: Blobs):
    blob = v.one("blobFileValue")
    if isinstance(blob, pb.Message) and v.one("immediateValue") is None:
        return blobs.loader(name, blob, shape)

    def load() -> np.ndarray:
        arr = _immediate(v)
        if arr is None:
            raise ViewerError("This ML Program constant has no value stored in the model.")
        return arr.reshape(shape) if shape and count(shape) == arr.size else arr
    return load
