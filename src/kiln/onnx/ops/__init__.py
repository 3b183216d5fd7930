"""One module per ONNX op family; each function converts one op at one version range."""
