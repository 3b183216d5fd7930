"""The gRPC service definition: wire-compatible with tritonclient's, and the committed modules are protoc's output."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import kiln.serve.proto as proto_pkg

pytest.importorskip("grpc_tools", reason="needs grpcio-tools (pip install grpcio-tools)")


def _descriptor_set(tmp_path: Path):
    """Our .proto compiled by protoc into a FileDescriptorSet (not loaded into any descriptor pool)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc
    src_root = Path(proto_pkg.__file__).parents[3]
    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", f"-I{src_root}", f"--descriptor_set_out={out}", str(src_root / proto_pkg.PROTO)]) == 0
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds.file[0]


def _messages(prefix: str, messages) -> dict[str, dict[str, tuple[int, int, int]]]:
    out = {}
    for m in messages:
        name = f"{prefix}{m.name}"
        if not m.options.map_entry:
            out[name] = {f.name: (f.number, f.type, f.label) for f in m.field}
        out.update(_messages(name + ".", m.nested_type))
    return out


def test_every_message_and_call_matches_tritonclients_definition(tmp_path):
    tc = pytest.importorskip("tritonclient.grpc.service_pb2", reason="needs tritonclient[grpc]")
    from google.protobuf import descriptor_pb2
    ours = _descriptor_set(tmp_path)
    theirs = descriptor_pb2.FileDescriptorProto()
    tc.DESCRIPTOR.CopyToProto(theirs)
    assert ours.package == theirs.package == "inference"
    mine, ref = _messages("", ours.message_type), _messages("", theirs.message_type)
    assert len(mine) >= 22
    for name, fields in mine.items():
        assert name in ref, name
        for field, spec in fields.items():
            assert ref[name].get(field) == spec, (name, field, spec, ref[name].get(field))
    service = {m.name: (m.input_type, m.output_type) for m in ours.service[0].method}
    their_service = {m.name: (m.input_type, m.output_type) for m in theirs.service[0].method}
    assert ours.service[0].name == theirs.service[0].name == "GRPCInferenceService"
    assert set(service) == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                            "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister"}
    for call, types in service.items():
        assert their_service[call] == types


def test_committed_modules_are_protocs_output(tmp_path):
    made = proto_pkg.generate(str(tmp_path))
    here = os.path.dirname(proto_pkg.__file__)
    for path in made:
        committed = Path(here, os.path.basename(path)).read_text()
        assert Path(path).read_text() == committed, f"{os.path.basename(path)}: run python -m kiln.serve.proto"
