"""``mpistyle-train``: train a fast style network (pytorch/examples' TransformerNet) on a style
image and a folder of photos or a video, with a VGG19 perceptual loss, on one or many MPI ranks.

  data.py        content images / video frames, per-step crops, style and sample images
  losses.py      the perceptual loss (content, Gram-matrix style, total variation)
  loop.py        setup, the data-parallel step, checkpoints and samples on a schedule
  checkpoint.py  resumable checkpoints and the final state dict, written atomically
  files.py       the run directory's layout
  cli.py         the Hydra command line
"""
