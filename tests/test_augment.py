"""Training-time augmentation: the batched random resized crop."""

import torch
import torch.nn.functional as F

from zoomvit.train.data import augment, crop_and_resize, random_resized_crop_boxes


def test_the_batched_crop_equals_cropping_and_resizing_each_image():
    x = torch.rand(6, 3, 32, 32)
    boxes = torch.tensor([[0, 0, 32, 32], [3, 5, 20, 17], [10, 0, 22, 32], [0, 12, 9, 20], [7, 7, 16, 16], [31, 31, 1, 1]], dtype=torch.float32)
    out = crop_and_resize(x, boxes)
    for i, (left, top, w, h) in enumerate(boxes.long().tolist()):
        ref = F.interpolate(x[i : i + 1, :, top : top + h, left : left + w], size=(32, 32), mode="bilinear", align_corners=False)[0]
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
    a, _ = augment(x, scale=(0.5, 1.0), hflip=True, generator=torch.Generator().manual_seed(3))
    b, _ = augment(x, scale=(0.5, 1.0), hflip=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, x)
