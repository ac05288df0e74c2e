"""Segmentation: prompts in pixels, engines (SAM, GrabCut), refinement, mask codecs, checkpoints.

Nothing here speaks HTTP or Label Studio.
"""
