"""JUDGER's perception step (jaxvlm.methods.judger): the relative attention map against transformers'
eager attention, and the adaptive crop box against a plain transcription of the spec's pseudo-code
(../shared/specs/cos_sctune_judger.md §3.1-3.2)."""
import numpy as np
import pytest

from jaxvlm.methods import judger
from test_llava_parity import IMG, tiny_llava_hf, torch_mods  # noqa: F401 (fixture)


def reference_box(att, size, bbox=336, ratios=judger.RATIOS):
    """The spec's loop, written out: every ratio's window sums scanned x outer / y inner (first maximum),
    the sharpness against the existing 4-neighbours, the first sharpest ratio, then the clamped square."""
    rows, cols = att.shape
    w, h = size
    bw, bh = w / cols, h / rows
    found = []
    for r in ratios:
        nx, ny = min(int(bbox * r / bw), cols), min(int(bbox * r / bh), rows)
        if cols - nx < 1 and rows - ny < 1:
            if r == ratios[0]:
                return 0, 0, w, h
            continue
        S = np.zeros((rows - ny + 1, cols - nx + 1))
        best, pos = -np.inf, (0, 0)
        for x in range(S.shape[1]):
            for y in range(S.shape[0]):
                S[y, x] = sum(att[yy, xx] for yy in range(y, y + ny) for xx in range(x, x + nx))
                if S[y, x] > best:
                    best, pos = S[y, x], (x, y)
        x, y = pos
        nb = [S[y, x - 1]] if x > 0 else []
        nb += [S[y, x + 1]] if x < S.shape[1] - 1 else []
        nb += [S[y - 1, x]] if y > 0 else []
        nb += [S[y + 1, x]] if y < S.shape[0] - 1 else []
        found.append(((best - np.mean(nb)) / (nx * ny), r, pos, (nx, ny)))
    k = int(np.argmax([f[0] for f in found]))
    _, r, (x, y), (nx, ny) = found[k]
    side = bbox * r
    cx, cy = int(x * bw + bw * nx / 2), int(y * bh + bh * ny / 2)
    cx, cy = max(cx, side // 2), max(cy, side // 2)
    cx, cy = min(cx, w - side // 2), min(cy, h - side // 2)
    return max(0, cx - side // 2), max(0, cy - side // 2), min(w, cx + side // 2), min(h, cy + side // 2)


@pytest.mark.parametrize("size", [(1024, 768), (640, 960), (1600, 900), (700, 700)])
def test_crop_box_matches_the_reference_loop(size):
    rng = np.random.default_rng(sum(size))
    for trial in range(4):
        att = rng.random((24, 24)) ** 4
        if trial % 2:                                    # a hot spot somewhere, as a question's map has
            y, x = rng.integers(0, 20, 2)
            att[y:y + 3, x:x + 4] += 5.0
        box = judger.crop_box(att, size)
        assert box == pytest.approx(reference_box(att, size), abs=1e-9), (size, trial)
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]


def test_crop_box_centres_on_the_hot_spot_and_keeps_small_images_whole():
    att = np.full((24, 24), 0.01)
    att[4:6, 17:19] = 10.0                              # cells 17-18 across, 4-5 down
    x1, y1, x2, y2 = judger.crop_box(att, (1344, 1344))  # 56 px cells: a 336 px window is 6 cells
    assert x1 <= 17 * 56 and 19 * 56 <= x2 and y1 <= 4 * 56 and 6 * 56 <= y2     # the crop holds the spot
    assert x2 - x1 < 1344                                                         # and is a crop
    assert x2 - x1 == y2 - y1 and (x2 - x1) in {336 * r // 2 * 2 for r in judger.RATIOS}
    assert judger.crop_box(att, (320, 240)) == (0, 0, 320, 240)     # the window would be the whole map
    # a crop side under one cell (--judger-crop-size 20 on 56 px cells): one-cell windows, still on the spot
    x1, y1, x2, y2 = judger.crop_box(att, (1344, 1344), 20)
    assert 17 * 56 <= x1 < x2 <= 19 * 56 and 4 * 56 <= y1 < y2 <= 6 * 56


def test_relative_attention_matches_transformers_eager(torch_mods):
    import jax.numpy as jnp
    torch, transformers = torch_mods
    from jaxvlm.conversion.api import llava_from_torch
    hf = tiny_llava_hf(transformers, "llama2")
    hf.set_attn_implementation("eager")
    cfg, model, params = llava_from_torch(hf)
    rng = np.random.default_rng(5)
    prompt = lambda n: np.concatenate([[1], np.full(16, IMG), [13], rng.integers(3, IMG, n)])    # noqa: E731
    q_ids, g_ids = prompt(11), prompt(7)
    pix = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    layer = 1
    ours = judger.relative_attention(model, params, q_ids, g_ids, pix, layer=layer)
    maps = []
    for ids in (q_ids, g_ids):
        with torch.no_grad():
            out = hf(input_ids=torch.tensor(ids[None]), pixel_values=torch.tensor(pix), output_attentions=True)
        a = out.attentions[layer][0, :, -1].numpy()[:, ids == IMG]
        maps.append(a.astype(np.float64).mean(0).reshape(4, 4))
    ref = maps[0] / maps[1]
    assert ours.shape == (4, 4)
    np.testing.assert_allclose(ours, ref, rtol=2e-5)            # a ratio of two maps, each within ~1e-5
    assert not np.allclose(ref, 1.0, rtol=1e-2)                 # the two prompts look at the image differently
    assert judger.crop_box(ours, (1000, 900), bbox_size=100) == judger.crop_box(ref, (1000, 900), bbox_size=100)
    with pytest.raises(ValueError, match="11 and 16 image tokens; both need the same square grid"):
        judger.relative_attention(model, params, q_ids[:12], g_ids, pix, layer=layer)
    # Prompts of other lengths in the same 32-token bucket reuse the compiled forward.
    fn = judger._last_token_attention(model, layer)
    before = fn._cache_size()
    judger.relative_attention(model, params, prompt(9), prompt(3), pix, layer=layer)
    assert fn._cache_size() == before
