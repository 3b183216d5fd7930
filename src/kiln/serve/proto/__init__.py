"""The KServe v2 gRPC service definition and the modules protoc generates from it.

``grpc_predict_v2_pb2`` and ``grpc_predict_v2_pb2_grpc`` are grpcio-tools output, committed
as generated; ``python -m kiln.serve.proto`` regenerates them after a change to the .proto.
Importing this package alone loads neither (they register the ``inference`` protobuf package).
"""
from __future__ import annotations

import os
import shutil
import tempfile

PROTO = "kiln/serve/proto/grpc_predict_v2.proto"
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py")


def generate(out_dir: str) -> list[str]:
    """Run protoc (grpcio-tools) on the .proto; write the two generated modules into ``out_dir``."""
    from grpc_tools import protoc
    src_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main(["protoc", f"-I{src_root}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                          os.path.join(src_root, PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
        made = []
        for name in GENERATED:
            dst = os.path.join(out_dir, name)
            shutil.copyfile(os.path.join(tmp, os.path.dirname(PROTO), name), dst)
            made.append(dst)
    return made
