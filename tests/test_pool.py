"""pool.py: mean pooling of crop tokens and v1 zoom-in selection, against hand-computed values."""
import pytest
import torch

import pool
import release_rules


def grid_tokens(g, D=2):
    """CLS = -1, then patch (r, c) holds value r * g + c in every channel."""
    patches = torch.arange(g * g, dtype=torch.float32)[:, None].expand(g * g, D)
    return torch.cat([torch.full((1, D), -1.0), patches])[None]  # (1, 1 + g*g, D)


def test_release_pooling_turns_577_tokens_into_cls_plus_36():
    out = pool.mean_pool(torch.randn(3, 577, 8), 6)
    assert out.shape == (3, 37, 8)


def test_pooled_token_is_the_mean_of_its_block_and_cls_comes_first():
    out = pool.mean_pool(grid_tokens(4), 2)[0, :, 0]
    # 4x4 grid values 0..15; block (0,0) = {0,1,4,5} -> 2.5; (0,1) = {2,3,6,7} -> 4.5; ...
    assert out.tolist() == [-1.0, 2.5, 4.5, 10.5, 12.5]


@pytest.mark.parametrize("grid,tokens", [(3, 9), (4, 16), (6, 36), (8, 64), (12, 144)])
def test_paper_token_budgets_per_crop(grid, tokens):
    assert pool.mean_pool(torch.randn(1, 577, 4), grid, keep_cls=False).shape[1] == tokens


def test_pooling_to_a_grid_that_does_not_divide_fails_clearly():
    with pytest.raises(ValueError, match="must divide"):
        pool.mean_pool(torch.randn(1, 577, 4), 5)


def test_adaptive_pooling_of_8x8_to_3x3_averages_overlapping_windows():
    # the zoom demo's 8x8 crops at the paper's 3x3: cell i spans floor(8i/3) .. ceil(8(i+1)/3) - 1,
    # i.e. rows/cols {0,1,2}, {2,3,4,5}, {5,6,7}; patch (r, c) holds 8r + c, so a window's mean is
    # 8 * mean(rows) + mean(cols)
    out = pool.mean_pool(grid_tokens(8), 3, adaptive=True)[0, :, 0]
    means = [1.0, 3.5, 6.0]
    assert out.tolist() == pytest.approx([-1.0] + [8 * r + c for r in means for c in means])


def test_pooling_commutes_with_the_linear_projection():
    x, proj = torch.randn(2, 577, 16), torch.nn.Linear(16, 8)
    torch.testing.assert_close(pool.mean_pool(proj(x), 6), proj(pool.mean_pool(x, 6)), atol=1e-5, rtol=1e-5)


def test_release_regions_are_runs_of_six():
    assert pool.release_regions(24, 4) == [list(range(i, i + 6)) for i in (0, 6, 12, 18)]


def test_spatial_regions_are_the_quadrants_of_a_6x4_grid():
    regions = pool.spatial_regions((6, 4), (2, 2))
    assert regions[0] == [0, 1, 2, 6, 7, 8]       # top-left: rows 0-1, cols 0-2
    assert regions[3] == [15, 16, 17, 21, 22, 23]  # bottom-right


def test_spatial_and_release_regions_differ_for_wide_grids():
    # 8x3 high grid under a 4x1 medium grid: a region is 2 columns x 3 rows, not a run of 6.
    assert pool.spatial_regions((8, 3), (4, 1))[0] == [0, 1, 8, 9, 16, 17]
    assert pool.release_regions(24, 4)[0] == [0, 1, 2, 3, 4, 5]


def test_region_topk_keeps_the_most_similar_crops_in_index_order():
    medium = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    high = torch.tensor([[0.1, 0], [0.9, 0], [0.5, 0], [0, 0.2], [0, 0.7], [0, 0.3]])
    idx = pool.select_region_topk(medium, high, [[0, 1, 2], [3, 4, 5]], k=2)
    assert idx.tolist() == [1, 2, 4, 5]


def test_region_topk_breaks_exact_bf16_ties_as_the_release():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        medium = torch.randint(-2, 3, (4, 8), generator=g).to(torch.bfloat16)
        high = torch.randint(-1, 2, (24, 8), generator=g).to(torch.bfloat16)  # few distinct scores
        scores = high.float() @ medium.float().T
        assert any(len(set(scores[6 * i:6 * i + 6, i].tolist())) < 6 for i in range(4))  # ties present
        ours = pool.select_region_topk(medium, high, pool.release_regions(24, 4), k=3)
        assert ours.tolist() == release_rules.zoom_selection(medium, high).tolist()


def test_global_topk_may_take_all_crops_from_one_region():
    medium = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    high = torch.tensor([[5.0, 0], [4.0, 0], [3.0, 0], [0, 0.2], [0, 0.1], [0, 0.3]])
    assert pool.select_global_topk(medium, high, 3).tolist() == [0, 1, 2]


def test_summary_is_the_mean_token():
    assert pool.summary(torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])).tolist() == [[2.0, 4.0]]


def test_resampler_turns_any_crop_into_36_latents():
    r = pool.PerceiverResampler(32, depth=3, n_latents=36, heads=4)
    assert r(torch.randn(2, 576, 32)).shape == (2, 36, 32)
    assert r(torch.randn(3, 49, 32)).shape == (3, 36, 32)
    assert len(r.layers) == 3


def test_resampler_ignores_token_order_within_a_crop():
    # no positions inside the resampler: the latents attend to a set of tokens
    torch.manual_seed(0)
    r, x = pool.PerceiverResampler(16, depth=2, n_latents=4, heads=2), torch.randn(1, 10, 16)
    torch.testing.assert_close(r(x), r(x[:, torch.randperm(10)]), atol=1e-5, rtol=1e-5)


def test_resampler_crops_do_not_see_each_other():
    torch.manual_seed(0)
    r, x = pool.PerceiverResampler(16, depth=2, n_latents=4, heads=2), torch.randn(2, 10, 16)
    torch.testing.assert_close(r(x)[:1], r(x[:1]), atol=1e-6, rtol=1e-6)
