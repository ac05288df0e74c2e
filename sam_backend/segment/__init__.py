"""Segmentation: prompts in pixels, engines (SAM, SAM 2.1, GrabCut) and their fast decoder path, refinement,
mask codecs, checkpoints.

Nothing here speaks HTTP or Label Studio.
"""
