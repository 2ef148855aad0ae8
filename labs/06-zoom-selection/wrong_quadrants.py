"""A known mistake for lab 06: regions as the paper's prose reads, the quadrants of a 6x4 high
grid, where the released code (whose weights were trained with it) takes runs of the
row-major list.
Caught by: release_regions_are_runs picks_match_the_release_on_the_golden ties_break_as_the_release
"""


def release_regions(n_high: int, n_medium: int):
    cols, rows, half_c, half_r = 6, n_high // 6, 3, n_high // 12
    regions = [[] for _ in range(n_medium)]
    for r in range(rows):
        for c in range(cols):
            regions[(r // half_r) * 2 + c // half_c].append(r * cols + c)
    return regions
