"""Triton kernels of the dpf op contract, installed as ``dpf_ext.triton_kernels``.

``kernels`` holds the ``@triton.jit`` kernels, ``launch`` the functions that build tensor
tables and launch them. They run on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (the test suite's way of checking them without a GPU).
"""
