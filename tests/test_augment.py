"""Training-time augmentation: the batched random resized crop."""

import torch
import torch.nn.functional as F

from zoomvit.train.data import augment, crop_and_resize, random_resized_crop_boxes


def test_the_batched_crop_equals_cropping_and_resizing_each_image():
    x = torch.rand(6, 3, 32, 32)
    boxes = torch.tensor(
        [[0, 0, 32, 32], [3, 5, 20, 17], [10, 0, 22, 32], [0, 12, 9, 20], [7, 7, 16, 16], [31, 31, 1, 1]],
        dtype=torch.float32,
    )
    out = crop_and_resize(x, boxes)
    for i, (left, top, w, h) in enumerate(boxes.long().tolist()):
        ref = F.interpolate(
            x[i : i + 1, :, top : top + h, left : left + w], size=(32, 32), mode="bilinear", align_corners=False
        )[0]
        assert torch.allclose(out[i], ref, atol=1e-5), (i, (out[i] - ref).abs().max())
    assert torch.allclose(out[0], x[0], atol=1e-6), "the full-image box is the identity"
    assert torch.allclose(out[5], x[5, :, 31:, 31:].expand(3, 32, 32), atol=1e-6), "a one-pixel box fills the image"


def test_random_boxes_stay_inside_the_image_and_cover_the_asked_area():
    g = torch.Generator().manual_seed(0)
    left, top, w, h = random_resized_crop_boxes(4096, 64, 48, (0.3, 0.8), g).unbind(1)
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= 48).all() and (top + h <= 64).all()
    fraction = w * h / (64 * 48)
    assert fraction.min() > 0.2 and fraction.max() <= 0.85 and 0.45 < fraction.mean() < 0.6
    assert len(set(left.tolist())) > 10 and len(set(top.tolist())) > 10


def test_augment_is_deterministic_for_a_generator_seed():
    x = torch.rand(8, 3, 16, 16)
    a = augment(x, scale=(0.5, 1.0), hflip=True, generator=torch.Generator().manual_seed(3)).x_BCHW
    b = augment(x, scale=(0.5, 1.0), hflip=True, generator=torch.Generator().manual_seed(3)).x_BCHW
    assert torch.equal(a, b) and not torch.equal(a, x)


def _ramp(size: int, B: int = 8) -> torch.Tensor:
    """A per-image linear ramp sampled at the pixel centres of a size x size grid over [0, 1]^2."""
    c = (torch.arange(size) + 0.5) / size
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(B, 1, 1, generator=g), torch.rand(B, 1, 1, generator=g)
    return (a * c[None, :, None] + b * c[None, None, :]).unsqueeze(1).expand(B, 3, size, size).contiguous()


def test_the_highres_copy_gets_the_same_crop_and_flip_as_the_image():
    x, hr = _ramp(32), _ramp(64)
    views = augment(x, scale=(0.3, 1.0), hflip=True, generator=torch.Generator().manual_seed(5), highres_BCHW=hr)
    assert views.highres_BCHW.shape == (8, 3, 64, 64)
    # A linear ramp is resampled exactly: the 2x2 mean of the cropped copy is the cropped image
    # (away from the box border, where sampling clamps to the box's own pixels).
    pooled = F.avg_pool2d(views.highres_BCHW, 2)
    torch.testing.assert_close(pooled[..., 2:-2, 2:-2], views.x_BCHW[..., 2:-2, 2:-2], rtol=0, atol=2e-3)


def test_relevance_maps_are_cropped_with_the_images_boxes_and_renormalised():
    B, S, G = 16, 64, 8
    g = torch.Generator().manual_seed(0)
    cells = torch.randint(2, 6, (B, 2), generator=g)
    x = torch.zeros(B, 3, S, S)
    maps = torch.zeros(B, G, G)
    for b, (r, c) in enumerate(cells.tolist()):
        x[b, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = 1.0
        maps[b, r, c] = 1.0
    views = augment(x, scale=(0.5, 1.0), hflip=True, generator=torch.Generator().manual_seed(2), maps_BHW=maps)
    assert views.maps_BHW.amin(dim=(1, 2)).eq(0).all() and views.maps_BHW.amax(dim=(1, 2)).sub(1).abs().lt(1e-6).all()
    # where the bright cell went in the cropped image is where the map's peak went
    image_cells = F.avg_pool2d(views.x_BCHW[:, 0:1], 8).squeeze(1)
    assert torch.equal(image_cells.flatten(1).argmax(1), views.maps_BHW.flatten(1).argmax(1))
