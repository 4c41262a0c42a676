"""Developer checks of the GPU code that need no GPU (not library API).

- :mod:`.static_check`: AOT-compiles every Triton specialisation for sm_80/sm_90 (``--realistic``: the compiles of
  real calls, sm_80/86/89/90) and reads registers, shared memory, spills, the SASS and the occupancy from the cubin
  (``python -m vstar_kernels.checks.static_check``).
- :mod:`.traffic_model`: the HBM bytes of one forward call of either GPU kernel, from its launch configuration
  (``python -m vstar_kernels.checks.traffic_model``).
- :mod:`.nvcc_check`: compiles the CUDA fallback with nvcc (sm_75-sm_90, torch's flags) and reads ptxas' resource
  usage; fails on spills and on any FP64 (``python -m vstar_kernels.checks.nvcc_check``).
"""
