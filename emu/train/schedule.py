"""Learning-rate schedules as multipliers of each parameter group's peak learning rate.

One multiplier serves every group, so the three stage-1 groups (projection 1e-4, LM 3e-5,
encoder 5e-5; Emu2 §2.2.2) keep their ratios through warmup and decay. A run may consist of
segments that each restart warmup and decay: Emu2 restarts stage 1 at 448 px for 4,000 more
iterations after 35,200 at 224 px.
"""

from __future__ import annotations

import math

from emu.train.config import ScheduleConfig


def warmup_steps(schedule: ScheduleConfig, steps: int) -> int:
    return schedule.warmup_steps if schedule.warmup_steps > 0 else round(schedule.warmup_ratio * steps)


def multiplier(step: int, steps: int, schedule: ScheduleConfig) -> float:
    """The multiplier at 0-based `step` of a `steps`-long schedule.

    Warmup over the first W steps: linear ((step + 1) / W) or logarithmic
    (log(step + 2) / log(W + 1), Emu2's decoder warm-up, §2.2.3), reaching 1 at step W - 1.
    Then decay from 1 to `min_lr_ratio` at the last step: cosine, linear, or none (constant).
    """
    warm = warmup_steps(schedule, steps)
    if step < warm:
        if schedule.warmup == "log":
            return min(1.0, math.log(step + 2) / math.log(warm + 1))
        return (step + 1) / warm
    if schedule.decay == "constant":
        return 1.0
    span = max(1, steps - warm - 1)
    progress = min(1.0, (step - warm) / span)
    floor = schedule.min_lr_ratio
    if schedule.decay == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)


def segmented_multiplier(step: int, boundaries: list[int], total: int, schedule: ScheduleConfig) -> float:
    """`multiplier` where each segment [b_i, b_{i+1}) restarts warmup and decay (boundaries sorted,
    each > 0 and < total)."""
    starts = [0, *boundaries]
    ends = [*boundaries, total]
    for start, end in zip(starts, ends):
        if start <= step < end:
            return multiplier(step - start, end - start, schedule)
    return multiplier(total - 1 - starts[-1], total - starts[-1], schedule)
