"""How a sample becomes a token sequence: the pure rules every stage shares.

``tokens`` (token accounting: the packer's estimate and exact text/ViT/VAE counts per sample),
``grid`` (patchify, unpatchify, 2-D position ids of an image grid) and ``layout`` (a pack's
documents and splits, and the attention rule ``visible``). The statistics, the packed dataset, the
model and the inferencer all call these, so they agree by construction. Imports ``config`` only.
"""
