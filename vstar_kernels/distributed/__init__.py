"""Frame parallelism over torch.distributed: one long-video UNet forward split over ranks by frames."""

from .frame_parallel import (
    FrameParallelState,
    SplitGroupNorm,
    disable_frame_parallel,
    enable_frame_parallel,
    frame_parallel_state,
)
from .layout import split_sizes

__all__ = ["FrameParallelState", "SplitGroupNorm", "disable_frame_parallel", "enable_frame_parallel",
           "frame_parallel_state", "split_sizes"]
