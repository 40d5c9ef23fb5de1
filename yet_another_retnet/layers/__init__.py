"""``nn.Module`` building blocks: multi-scale retention, norms and feed-forward networks."""

from .retention import MultiheadRetention, MultiScaleRetention, RetentionState

__all__ = ["MultiScaleRetention", "MultiheadRetention", "RetentionState"]
