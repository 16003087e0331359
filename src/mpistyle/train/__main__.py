"""``python -m mpistyle.train``: the same program as ``mpistyle-train``."""
from .cli import main

main()
