"""The released v1 zoom-in selection restated in a few lines: the reference that
pool.select_region_topk is held to on bf16 scores with ties (tests/test_pool.py, and lab 06's
check). Source: `region_token_interval = 6` and the `-inf` masks before `torch.topk` in the v1
`DragonflyForCausalLM.forward`, src/dragonfly/models/dragonfly/modeling_dragonfly.py
(docs/release-facts.md#zoom-in-selection)."""
import torch


def zoom_selection(medium, high, k=3, run=6):
    """Medium crop i scores all high crops with one product, adds a float32 mask (-inf outside
    [run*i, run*i + run)) and takes top-k over the whole list; the picks, ascending."""
    picks = []
    for i in range(medium.shape[0]):
        scores = torch.matmul(high, medium[i].unsqueeze(-1)).squeeze(-1)
        mask = torch.zeros(high.shape[0])
        mask[[j for j in range(high.shape[0]) if not run * i <= j < run * (i + 1)]] = float("-inf")
        picks.append(torch.topk(scores + mask, k).indices)
    return torch.sort(torch.cat(picks)).values
