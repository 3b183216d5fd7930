"""Regenerate the gRPC modules from grpc_predict_v2.proto (needs grpcio-tools)."""
from __future__ import annotations

import os

from kiln.serve.proto import generate

if __name__ == "__main__":
    for path in generate(os.path.dirname(os.path.abspath(__file__))):
        print(f"wrote {path}")
