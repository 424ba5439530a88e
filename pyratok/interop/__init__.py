"""Interop with other codebases: one-line swaps (see README "Use pyratok from your codebase").

* :mod:`pyratok.interop.diffusers`: ``WanVAE`` <-> diffusers ``AutoencoderKLWan`` in memory,
  diffusers-style return types, and :func:`~pyratok.interop.diffusers.patch_causal_convs`,
  which routes an existing diffusers model's causal convolutions through pyratok's op.
* ``pyratok.nn.LFQ``: vector-quantize-pytorch's ``LFQ`` (and Open-MAGVIT2's options).

Nothing here imports diffusers until a function that needs it is called.
"""
