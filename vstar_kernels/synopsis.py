"""Video Synopsis Prompting (VSTAR's second half): a synopsis of K visual states, interpolated to one text embedding
per frame, so a long video evolves as the prompt says.

- :func:`synopsis_embeddings` turns K keyframe embeddings into per-frame embeddings;
- :func:`generate_synopsis` asks any ``str -> str`` language model for K states (prompt: :data:`SYNOPSIS_TEMPLATE`),
  and :func:`parse_synopsis` reads its answer, however it is numbered, bulleted or quoted;
- :func:`vstar_kernels.diffusers.apply_synopsis` feeds the per-frame embeddings to a video UNet.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable

import torch

SYNOPSIS_MODES = ("linear", "same")

SYNOPSIS_TEMPLATE = """\
You write a video synopsis: the visual states a video passes through, in order, one per line.
Each state is a short, self-contained image description (subject, action, setting, light). The first state is
how the video starts, the last how it ends; the states in between are evenly spaced in time.

Prompt: a tree through the four seasons
States (4):
1. a leafless tree in a snowy field under a pale winter sky
2. a tree with fresh green buds in a spring meadow
3. a tree with a dense green crown in bright summer sunlight
4. a tree with orange and red leaves falling in autumn

Prompt: a candle burning down
States (3):
1. a tall new candle with a bright flame on a wooden table
2. a half-melted candle with wax dripping down its sides
3. a small stub of wax with a flickering flame about to go out

Prompt: {prompt}
States ({k}):
"""

_ITEM = re.compile(
    r"""^\s*(?:
        [-*•–—+]\s+                                              # bullets
      | \(?\d+\s*[.):\]-]\s*                                      # 1.  1)  (1)  1:  1]  1 -
      | (?:state|step|scene|stage|frame|shot|keyframe)\s*\#?\d+\s*[.:)\-–—]?\s*  # State 1: ...
    )(?P<text>.+?)\s*$""",
    re.IGNORECASE | re.VERBOSE,
)
_QUOTES = "\"'“”‘’`"


def _clean(text: str) -> str:
    return text.strip().strip(_QUOTES + " ").rstrip(" ,;")


def parse_synopsis(text: str, k: int | None = None) -> list[str]:
    """The states listed in a language model's answer, in order.

    Numbered (``1.``, ``1)``, ``(1)``, ``State 1:``, markdown ``**1.**``) or bulleted (``-``, ``*``, ``•``) lines
    are the states; prose before and after them is ignored. Without list markers, every non-empty line that is
    not a heading (ending in ``:``) is a state. Quotes around states are removed. With ``k``, the first ``k``
    states are returned and fewer than ``k`` is a ValueError quoting the answer.
    """
    lines = [re.sub(r"\*\*|__", "", line) for line in text.splitlines() if line.strip()]  # markdown bold
    items = [_clean(m["text"]) for line in lines if (m := _ITEM.match(line))]
    if not items:
        items = [_clean(line) for line in lines if not line.rstrip().endswith(":")]
    items = [item for item in items if item]
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(items) < k:
            raise ValueError(f"expected {k} states, found {len(items)} in the answer: {text!r}")
        items = items[:k]
    return items


def generate_synopsis(prompt: str, llm: Callable[[str], str], k: int, *, template: str = SYNOPSIS_TEMPLATE
                      ) -> list[str]:
    """K visual states for ``prompt`` from ``llm`` (any callable ``str -> str``, e.g. a local transformers pipeline
    wrapped to return its text). The template's in-context examples show the format; the answer is parsed with
    :func:`parse_synopsis`."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    answer = llm(template.format(prompt=prompt.strip(), k=k))
    if not isinstance(answer, str):
        raise TypeError(f"llm must return a str, got {type(answer).__name__}")
    return parse_synopsis(answer, k)


def keyframe_indices(num_keyframes: int, num_frames: int) -> torch.Tensor:
    """Frames of K evenly spaced keyframes, first and last frame included (int64, rounded to the nearest frame)."""
    if num_keyframes == 1:
        return torch.zeros(1, dtype=torch.int64)
    positions = torch.arange(num_keyframes, dtype=torch.float64) * (num_frames - 1) / (num_keyframes - 1)
    return torch.round(positions).to(torch.int64)


def synopsis_embeddings(keyframe_embeds: torch.Tensor, num_frames: int, mode: str = "linear", *,
                        pipe: object | None = None) -> torch.Tensor:
    """Per-frame text embeddings (frames, tokens, dim) from K keyframe embeddings (K, tokens, dim).

    Keyframes sit at evenly spaced frames, the first and the last frame included, and their embeddings are exact
    there. ``mode="linear"`` interpolates linearly between neighbouring keyframes; ``"same"`` holds each keyframe
    until the next. K = 1 repeats it; K > num_frames is an error. Index arithmetic is int64/float64 (any frame
    count); values are computed in float32 or better and returned in the input dtype.

    ``pipe``: the pipeline (or video transformer) the embeddings are for. With a video transformer, which
    conditions *latent* frames, ``num_frames`` is the video's frame count and the rows are its latent frames: a VAE
    of temporal compression c (Wan 4, LTX-Video 8) turns c·n + 1 frames into n + 1 latent frames, latent frame 0
    holding video frame 0 and latent frame j >= 1 video frames c(j-1)+1 .. cj. Each keyframe sits at the evenly
    spaced *video* frame, as above, and takes the latent frame that holds it; another frame count raises a
    ValueError naming the nearest valid ones. With a UNet pipeline (or None) the rows are the video frames.
    """
    if not isinstance(keyframe_embeds, torch.Tensor) or keyframe_embeds.dim() != 3:
        shape = tuple(keyframe_embeds.shape) if isinstance(keyframe_embeds, torch.Tensor) else type(keyframe_embeds)
        raise ValueError(f"keyframe_embeds must be (K, tokens, dim), got {shape}")
    if not keyframe_embeds.is_floating_point():
        raise TypeError(f"keyframe_embeds must be floating point (text embeddings), got {keyframe_embeds.dtype}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    num_frames = int(num_frames)  # numpy integers too
    if mode not in SYNOPSIS_MODES:
        raise ValueError(f"mode must be one of {SYNOPSIS_MODES}, got {mode!r}")
    k = keyframe_embeds.shape[0]
    if k < 1:
        raise ValueError("keyframe_embeds needs at least one keyframe")
    if k > num_frames:
        raise ValueError(f"{k} keyframes do not fit in {num_frames} frames (K must be <= num_frames)")
    keys = keyframe_indices(k, num_frames)
    compression = None if pipe is None else _temporal_compression(pipe)
    if compression is not None:
        num_frames, keys = latent_keyframes(keys, num_frames, compression)
    return interpolate_keyframes(keyframe_embeds, keys.to(keyframe_embeds.device), num_frames, mode)


def _temporal_compression(pipe: object) -> int | None:
    from .diffusers.dit.video_transformers import temporal_compression  # the integration, only with a pipeline

    return temporal_compression(pipe)


def latent_keyframes(keys: torch.Tensor, num_frames: int, compression: int) -> tuple[int, torch.Tensor]:
    """The latent frame count of ``num_frames`` video frames under a VAE of temporal ``compression`` (c·n + 1 ->
    n + 1) and the latent frame holding each keyframe (video frame v -> ceil(v / c)). ValueError for a frame count
    that is not c·n + 1 (naming the nearest valid ones) or two keyframes in one latent frame."""
    if (num_frames - 1) % compression:
        lower = (num_frames - 1) // compression * compression + 1
        raise ValueError(f"{num_frames} frames is not a valid length for this model: its VAE turns {compression}·n "
                         f"+ 1 frames into n + 1 latent frames; the nearest valid lengths are {lower} and "
                         f"{lower + compression}")
    latent = (num_frames - 1) // compression + 1
    latent_keys = (keys + compression - 1) // compression
    if latent_keys.numel() > 1 and bool((latent_keys[1:] == latent_keys[:-1]).any()):
        raise ValueError(f"{keys.numel()} keyframes over {num_frames} frames put two keyframes in one of the "
                         f"{latent} latent frames: use at most {latent} states")
    return latent, latent_keys


def interpolate_keyframes(keyframe_embeds: torch.Tensor, keys: torch.Tensor, num_frames: int,
                          mode: str = "linear") -> torch.Tensor:
    """(num_frames, tokens, dim) from keyframe embeddings (K, tokens, dim) at the increasing frames ``keys``
    (int64; the first is 0 and the last num_frames - 1 when K > 1), as :func:`synopsis_embeddings` describes."""
    k = keyframe_embeds.shape[0]
    if k == 1:
        return keyframe_embeds.expand(num_frames, -1, -1).clone()
    segment, weight = keyframe_weights(keys, num_frames, mode)
    compute = torch.promote_types(keyframe_embeds.dtype, torch.float32)
    w = weight.to(compute)[:, None, None]
    embeds = keyframe_embeds.to(compute)
    out = embeds[segment] * (1 - w) + embeds[segment + 1] * w
    return out.to(keyframe_embeds.dtype)


def keyframe_weights(keys: torch.Tensor, num_frames: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For each frame: the segment s (between keyframes s and s + 1) it lies in and the weight of keyframe s + 1
    (float64; 0 at keyframe s, 1 at keyframe s + 1)."""
    k = keys.numel()
    frames = torch.arange(num_frames, dtype=torch.int64, device=keys.device)
    # segment s covers frames keys[s] .. keys[s + 1]; the last keyframe's frame belongs to the last segment
    segment = (torch.searchsorted(keys, frames, right=True) - 1).clamp(0, k - 2)
    left, right = keys[segment], keys[segment + 1]
    weight = (frames - left).to(torch.float64) / (right - left).to(torch.float64)
    if mode == "same":
        weight = (frames >= right).to(torch.float64)  # hold the left keyframe until the next one starts
    return segment, weight
