"""Model repository: darknet to ONNX conversion, model configs, sessions and reference pre/post-processing."""
