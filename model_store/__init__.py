"""Models: what serves them, the tools that make and measure them, and the registry that releases them.

``model_store.serving``  what a serving process runs: ONNX Runtime sessions, model configs, decoders, boxes,
                         routing, the catalog a stage resolves versions from, the ModelPool, the in-process Detector
``model_store.tools``    offline tools: darknet conversion, quantization, evaluation and its set, the release gate,
                         sample images, the detect CLI and benchmark
``model_store.control``  the control plane: the registry (push, promote, canary, rollback) and the `models` watcher

``serving`` imports nothing from ``tools`` or ``control``; ``control`` and ``tools`` build on ``serving``.
"""
