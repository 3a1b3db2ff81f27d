"""Triton device code, installed as ``latentfast.kernels``.

Each module holds the ``@triton.jit`` kernels of one fused op plus thin launch
wrappers that allocate outputs and pick the grid. Nothing here knows about
autograd: ``latentfast.ops`` wires the launchers into ``torch.library`` ops.
"""
