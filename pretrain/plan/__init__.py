"""Layout planning: will a model and batch fit a cluster, how fast should it go, does it build.

`python -m pretrain.plan --config configs/1t.yaml --nodes 384 --gpus-per-node 8 --gpu h100-80gb`;
see docs/LAYOUTS.md. Nothing here allocates model memory or needs a GPU or a process group: sizes come
from the model built on the meta device, through the trainer's own layer, pipeline and tensor-parallel
code.
"""

from pretrain.plan.hardware import GPUS, Assumptions, Cluster, make_cluster
from pretrain.plan.planner import Plan, layout_problems, plan_layout
from pretrain.plan.search import SearchResult, search_layouts

__all__ = [
    "GPUS",
    "Assumptions",
    "Cluster",
    "Plan",
    "SearchResult",
    "layout_problems",
    "make_cluster",
    "plan_layout",
    "search_layouts",
]
