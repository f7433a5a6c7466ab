"""Export stack: Hugging Face model to validated ONNX model directory (needs the [export] extra)."""

__version__ = "0.1.0"
