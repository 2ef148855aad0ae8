"""A known mistake for lab 01: pixels shown are not capped at the image's own, so upscaling a
small image into a bigger canvas counts as showing more of it.
Caught by: shown_pixels_are_capped_at_the_image full_tie_goes_to_the_first_candidate
"""


def select_best_resolution(image_size, candidates):
    w, h = image_size
    best, best_effective, best_wasted = None, -1, float("inf")
    for W, H in candidates:
        scale = min(W / w, H / h)
        effective = int(w * scale) * int(h * scale)
        wasted = W * H - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (W, H), effective, wasted
    return best
