"""Developer checks of the GPU code that need no GPU (not library API).

- :mod:`.static_check`: AOT-compiles every Triton specialisation for sm_80/sm_90 and reads registers, shared memory
  and spills from the cubin (``python -m vstar_kernels.checks.static_check``).
- :mod:`.nvcc_check`: compiles the CUDA fallback with nvcc and reads ptxas' resource usage
  (``python -m vstar_kernels.checks.nvcc_check``).
"""
