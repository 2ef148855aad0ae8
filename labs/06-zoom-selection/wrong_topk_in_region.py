"""A known mistake for lab 06: each medium crop scores only its region's crops and takes top-k of
that short list. Without ties it keeps the same crops; with the ties bf16 makes frequent,
torch.topk of a different list can keep different ones than the release's top-k over the whole
masked list.
Caught by: ties_break_as_the_release
"""
import torch


def select_region_topk(medium_summary, high_summary, regions, k: int):
    chosen = []
    for i, region in enumerate(regions):
        index = torch.tensor(region, dtype=torch.long)
        scores = (high_summary[index] @ medium_summary[i][:, None])[:, 0]
        chosen.append(index[scores.topk(min(k, len(region))).indices])
    return torch.cat(chosen).sort().values
