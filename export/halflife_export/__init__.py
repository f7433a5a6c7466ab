"""Export stack: Hugging Face model to validated ONNX model directory (needs the [export] extra)."""

import halflife  # noqa: F401  first: it turns onnxruntime's telemetry off before optimum can import onnxruntime

__version__ = "0.1.0"
