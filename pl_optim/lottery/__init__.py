"""Lottery tickets (pure torch): magnitude masks that hold through every optimizer step, rewind
points, structured channel tickets and export. See ``docs/lottery_ticket.md``."""

from pl_optim.lottery.export import EncodingSize, encoding_bytes, export_ticket
from pl_optim.lottery.masks import (
    SCOPES,
    MaskSet,
    check_masks,
    magnitude_masks,
    ones_masks,
    prunable_weights,
    random_masks,
    remaining,
)
from pl_optim.lottery.rewind import RewindPoint, clear_optimizer_state, reinitialize
from pl_optim.lottery.structured import (
    channel_plan,
    channel_scores,
    kept_from_lists,
    kept_to_lists,
    parameter_count,
    prune_channels,
)

__all__ = [
    "SCOPES",
    "EncodingSize",
    "MaskSet",
    "RewindPoint",
    "channel_plan",
    "channel_scores",
    "check_masks",
    "clear_optimizer_state",
    "encoding_bytes",
    "export_ticket",
    "kept_from_lists",
    "kept_to_lists",
    "magnitude_masks",
    "ones_masks",
    "parameter_count",
    "prunable_weights",
    "prune_channels",
    "random_masks",
    "reinitialize",
    "remaining",
]
