"""A known mistake for lab 01: a full tie goes to the *later* candidate (`<=` where the release
has `<`), so a small strip gets (4,1) instead of the release's (2,2).
Caught by: full_tie_goes_to_the_first_candidate grids_match_the_release_pipeline
"""


def select_best_resolution(image_size, candidates):
    w, h = image_size
    best, best_effective, best_wasted = None, -1, float("inf")
    for W, H in candidates:
        scale = min(W / w, H / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = W * H - effective
        if effective > best_effective or (effective == best_effective and wasted <= best_wasted):
            best, best_effective, best_wasted = (W, H), effective, wasted
    return best
