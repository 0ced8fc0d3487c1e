"""Packed variable-length sequences give what padding with a mask gives: the same logits and gradients."""

import pytest
import timm
import torch

import zoomvit.models  # noqa: F401
from zoomvit.models.packed import pack, unpack


def _pair(**kwargs):
    torch.manual_seed(0)
    packed = timm.create_model("zoomvit_test_patch8_32", with_zoomer=False, sequences="packed", **kwargs)
    padded = timm.create_model("zoomvit_test_patch8_32", with_zoomer=False, sequences="padded", **kwargs)
    padded.load_state_dict(packed.state_dict())
    return packed, padded


def _mixed_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 32, 32, generator=g)
    scores = torch.rand(5, 4, 4, generator=g)
    alpha = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.0])  # 16 to 64 tokens: every image a different length
    return x, scores, alpha


@pytest.mark.parametrize("distilled", [False, True])
def test_packed_and_padded_attention_give_the_same_logits_for_a_batch_of_mixed_lengths(distilled):
    packed, padded = _pair(distilled=distilled)
    x, scores, alpha = _mixed_batch()
    logits, zt = packed.eval()(x, scores, alpha=alpha, return_tokens=True)
    assert len(set(zt.num_tokens_B.tolist())) == 5
    assert torch.allclose(logits, padded.eval()(x, scores, alpha=alpha), atol=1e-5)


def test_packed_and_padded_attention_give_the_same_gradients():
    packed, padded = _pair()
    x, scores, alpha = _mixed_batch()
    target = torch.arange(5) % 10
    for model in (packed, padded):
        torch.nn.functional.cross_entropy(model.train()(x, scores, alpha=alpha), target).backward()
    for (name, a), (_, b) in zip(packed.named_parameters(), padded.named_parameters()):
        if a.grad is not None or b.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_an_image_gets_the_same_logits_alone_as_in_a_packed_batch():
    packed, _ = _pair()
    x, scores, alpha = _mixed_batch()
    batch = packed.eval()(x, scores, alpha=alpha)
    for i in range(5):
        alone = packed(x[i : i + 1], scores[i : i + 1], alpha=alpha[i : i + 1])
        assert torch.allclose(batch[i], alone[0], atol=1e-5)


def test_pack_and_unpack_keep_each_images_tokens_in_place():
    x = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)
    keep = torch.tensor([[True, True, False], [True, True, True]])
    packed, offsets = pack(x, keep)
    assert packed.squeeze(-1).tolist() == [0, 1, 3, 4, 5] and offsets.tolist() == [0, 2, 5]
    assert torch.equal(unpack(packed, keep), x * keep.unsqueeze(-1))
