"""mpistyle: batch-score a frame-to-frame PyTorch model over a video with MPI; restyle videos."""
from __future__ import annotations

__version__ = "0.1.0"
