import numpy as np
import pytest

from lpo.world.grammar import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene
from lpo.world.render import DEFECTS, random_defects, render, render_batch


def scene(shape="square", position="center", size="large", color="red", background="gray"):
    return Scene(size, color, shape, background, position)


def draw(s, seed=0, size=32, defects=None):
    return render(s, np.random.default_rng(seed), size, defects)


def coverage(image):
    """Per-pixel share of shape colour, taking the corner as background and the farthest pixel as shape colour."""
    pixels = image.astype(np.float64)
    bg = pixels[0, 0]
    far = pixels.reshape(-1, 3)[np.abs(pixels - bg).sum(-1).argmax()]
    return np.clip((pixels - bg) @ (far - bg) / ((far - bg) @ (far - bg)), 0, 1)


def centre_of_mass(image):
    ys, xs = np.nonzero(coverage(image) > 0.5)
    return xs.mean(), ys.mean()


def bbox_fill(image):
    cov = coverage(image)
    ys, xs = np.nonzero(cov > 0.5)
    return cov.sum() / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))


def gradient_energy(image):
    pixels = image.astype(np.float64)
    return (np.diff(pixels, axis=0) ** 2).sum() + (np.diff(pixels, axis=1) ** 2).sum()


@pytest.mark.parametrize("size", [16, 32, 64])
def test_shape_dtype_and_sizes(size):
    image = draw(scene(), size=size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_too_small_image_raises():
    with pytest.raises(ValueError, match="image_size=15"):
        draw(scene(), size=15)


def test_same_rng_state_gives_identical_bytes():
    defects = {"noise": 0.7, "bleeding": 0.5}
    assert draw(scene(), 5, defects=defects).tobytes() == draw(scene(), 5, defects=defects).tobytes()
    assert draw(scene(), 5).tobytes() != draw(scene(), 6).tobytes()


def test_batch_matches_consecutive_renders():
    scenes = [scene("circle"), scene("cross", "left", "small")]
    defects = [{}, {"blur": 0.5}]
    batch = render_batch(scenes, np.random.default_rng(3), 32, defects)
    rng = np.random.default_rng(3)
    assert batch.shape == (2, 32, 32, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch, np.stack([render(s, rng, 32, d) for s, d in zip(scenes, defects)]))
    with pytest.raises(ValueError, match="2 scenes but 1"):
        render_batch(scenes, rng, 32, [{}])


@pytest.mark.parametrize("background", list(BACKGROUNDS))
@pytest.mark.parametrize("color", ["red", "yellow", "blue"])
def test_background_and_shape_colours(background, color):
    image = draw(scene("circle", color=color, background=background), seed=1).astype(int)
    corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.abs(corners - BACKGROUNDS[background]).max() <= 8
    assert (np.abs(image - COLORS[color]).max(-1) <= 8).sum() >= 20


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_position_moves_the_shape(shape, size):
    for seed in range(3):
        x = {p: centre_of_mass(draw(scene(shape, p, size), seed))[0] for p in POSITIONS}
        y = {p: centre_of_mass(draw(scene(shape, p, size), seed))[1] for p in POSITIONS}
        assert x["left"] + 2 < x["center"] < x["right"] - 2
        assert y["top"] + 2 < y["center"] < y["bottom"] - 2
        assert abs(x["top"] - x["center"]) < 4 and abs(y["left"] - y["center"]) < 4


@pytest.mark.parametrize("shape", SHAPES)
def test_large_covers_more_than_small(shape):
    for seed in range(3):
        small, large = (coverage(draw(scene(shape, size=s), seed)).sum() for s in SIZES)
        assert large > 2 * small


def test_shapes_have_distinct_masks():
    fill = {s: np.mean([bbox_fill(draw(scene(s), seed, size=64)) for seed in range(8)]) for s in SHAPES}
    assert fill["square"] > fill["circle"] + 0.05
    assert fill["circle"] > max(fill["diamond"], fill["triangle"]) + 0.15
    assert 0.55 < fill["cross"] < fill["circle"]


def test_cross_has_a_full_centre_and_empty_corners():
    cov = coverage(draw(scene("cross"), size=64))
    ys, xs = np.nonzero(cov > 0.5)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    assert cov[cy - 3:cy + 4, cx - 3:cx + 4].min() > 0.95
    corner = max(2, (x1 - x0) // 5)
    for ys_, xs_ in [(slice(y0, y0 + corner), slice(x0, x0 + corner)), (slice(y1 - corner + 1, y1 + 1),
                                                                      slice(x1 - corner + 1, x1 + 1))]:
        assert cov[ys_, xs_].max() < 0.5


def test_diamond_and_square_differ_at_the_corners():
    for seed in range(4):
        square, diamond = (coverage(draw(scene(s), seed, size=64)) for s in ("square", "diamond"))
        assert square.sum() > 1.4 * diamond.sum()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("position", POSITIONS)
def test_clean_shapes_stay_off_the_border(position, size):
    for shape in SHAPES:
        for seed in range(4):
            image = draw(scene(shape, position, size), seed)
            border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
            assert (border == image[0, 0]).all(), (shape, seed)


def _pair(defect, severity=0.4, s=None, seed=0):
    s = s or scene("square", "center", "small")
    clean = draw(s, seed).astype(np.float64)
    return clean, draw(s, seed, defects={defect: severity}).astype(np.float64)


def test_blur_lowers_gradient_energy():
    clean, blurred = _pair("blur")
    assert gradient_energy(blurred) < 0.7 * gradient_energy(clean)
    _, more = _pair("blur", 1.0)
    assert gradient_energy(more) < gradient_energy(blurred)


def test_noise_raises_high_frequency_energy_in_flat_areas():
    clean, noisy = _pair("noise")
    flat = (slice(0, 8), slice(0, 8))  # background corner, away from the small centred square
    assert gradient_energy(clean[flat]) == 0
    assert noisy[flat].std() > 15
    # 2x2 blocks: neighbours within a block agree more than neighbours across blocks
    within = np.abs(noisy[flat][0::2] - noisy[flat][1::2]).mean()
    across = np.abs(noisy[flat][1:-1:2] - noisy[flat][2::2]).mean()
    assert within < 0.5 * across


@pytest.mark.parametrize("severity", [0.4, 1.0])
def test_low_contrast_shrinks_spread_by_its_factor(severity):
    clean, flat = _pair("low_contrast", severity, scene("circle", background="white", color="blue"))
    assert _spread(flat) / _spread(clean) == pytest.approx(1 - 0.75 * severity, abs=0.02)


def _spread(image):
    return np.linalg.norm(image - image.mean(axis=(0, 1)))


@pytest.mark.parametrize("position, side", [("left", (slice(None), 0)), ("right", (slice(None), -1)),
                                            ("top", (0, slice(None))), ("bottom", (-1, slice(None)))])
def test_clipping_cuts_the_shape_at_its_nearest_border(position, side):
    for severity in (0.4, 1.0):
        s = scene("square", position, "large", color="blue", background="white")
        clean, clipped = _pair("clipping", severity, s)
        bg = clean[0, 0]
        assert (np.abs(clipped[side] - bg).sum(-1) > 100).sum() >= 5
        kept = coverage(clipped.astype(np.uint8)).sum() / coverage(clean.astype(np.uint8)).sum()
        assert abs(kept - (1 - (0.3 + 0.4 * severity))) < 0.12


def test_clipping_a_centred_shape_reaches_some_border():
    for seed in range(4):
        clean, clipped = _pair("clipping", 0.5, seed=seed)
        border = np.concatenate([clipped[0], clipped[-1], clipped[:, 0], clipped[:, -1]])
        assert (np.abs(border - clean[0, 0]).sum(-1) > 100).any()


def test_bleeding_tints_a_ring_around_the_shape_only():
    s = scene("square", "center", "small", color="red", background="white")
    clean, bled = _pair("bleeding", 0.6, s)
    inside, touched = coverage(clean.astype(np.uint8)) > 0.99, coverage(clean.astype(np.uint8)) > 0.01
    ring = _dilate(touched, 3) & ~touched
    red, bg = np.array(COLORS["red"], float), clean[0, 0]
    assert _share_of(bled, bg, red)[ring].mean() > _share_of(clean, bg, red)[ring].mean() + 0.12
    np.testing.assert_array_equal(bled[inside], clean[inside])  # the shape itself stays sharp
    for corner in (slice(0, 4), slice(0, 4)), (slice(-4, None), slice(-4, None)):
        assert np.abs(bled[corner] - clean[corner]).max() <= 2


def _dilate(mask, radius):
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= np.roll(mask, (dy, dx), axis=(0, 1))
    return out


def _share_of(image, bg, color):
    return (image - bg) @ (color - bg) / ((color - bg) @ (color - bg))


def test_defects_differ_from_each_other():
    images = {d: draw(scene("triangle", "left", "small"), defects={d: 0.6}).astype(int) for d in DEFECTS}
    for a in DEFECTS:
        for b in DEFECTS:
            if a < b:
                assert np.abs(images[a] - images[b]).mean() > 1, (a, b)


def test_zero_severity_is_clean():
    np.testing.assert_array_equal(draw(scene(), 2, defects={d: 0.0 for d in DEFECTS}), draw(scene(), 2))


@pytest.mark.parametrize("defects, match", [({"smudge": 0.5}, "smudge"), ({"blur": 1.5}, "blur"),
                                            ({"noise": -0.1}, "noise"), ({"clipping": float("nan")}, "clipping")])
def test_bad_defects_raise(defects, match):
    with pytest.raises(ValueError, match=match):
        draw(scene(), defects=defects)


def test_random_defects():
    rng = np.random.default_rng(0)
    draws = [random_defects(rng, max_defects=3) for _ in range(300)]
    assert {len(d) for d in draws} == {1, 2, 3}
    assert {name for d in draws for name in d} == set(DEFECTS)
    assert all(0.4 <= v <= 1.0 for d in draws for v in d.values())
    assert all(len(d) == 1 for d in (random_defects(rng, max_defects=1) for _ in range(20)))
    with pytest.raises(ValueError, match="max_defects"):
        random_defects(rng, max_defects=0)
