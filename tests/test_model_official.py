"""Conventions of the official DINO: input forms, initialisation, two-stage query selection, pretrained backbones."""
import math
import urllib.error

import pytest
import torch
import torchvision

from models import build_model, load_pretrained_backbone
from models.dino.transformer import DeformableTransformer
from util.misc import NestedTensor, nested_tensor_from_tensor_list
from tiny import tiny_args


def _unpadded(x):
    return NestedTensor(x, torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool))


def _assert_same(a, b):
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_model_accepts_tensors_and_lists_as_the_official():
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args())
    model.eval()
    x = torch.randn(2, 3, 64, 80)
    images = [torch.randn(3, 64, 80), torch.randn(3, 48, 64)]
    with torch.no_grad():
        _assert_same(model(x), model(_unpadded(x)))
        single = model(_unpadded(x[:1]))
        _assert_same(model(x[0]), single)
        _assert_same(model([x[0]]), single)
        _assert_same(model(images), model(nested_tensor_from_tensor_list(images)))
        with pytest.raises(ValueError, match=r"\(3, H, W\) or \(B, 3, H, W\); got shape \(64, 80\)"):
            model(x[0, 0])


def test_initialisation_as_official():
    """xavier for every matrix, tgt_embed included; then each attention's own reset; level_embed ~ N(0, 1)."""
    torch.manual_seed(0)
    t = DeformableTransformer(d_model=32, nhead=4, num_queries=300, num_encoder_layers=1, num_decoder_layers=1,
                              dim_feedforward=64)
    bound = math.sqrt(6 / (300 + 32))  # xavier_uniform_ for a (300, 32) matrix
    tgt = t.tgt_embed.weight
    assert tgt.abs().max() <= bound  # N(0, 1) would reach about 4
    assert tgt.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert t.level_embed.std().item() == pytest.approx(1.0, rel=0.3)
    assert t.enc_output.weight.abs().max() <= math.sqrt(6 / 64)
    attn = t.encoder.layers[0].self_attn
    assert (attn.sampling_offsets.weight == 0).all() and (attn.attention_weights.weight == 0).all()
    assert attn.sampling_offsets.bias.abs().max() > 0


def _tiny_transformer(mask_invalid):
    return DeformableTransformer(d_model=8, nhead=2, num_queries=3, num_encoder_layers=0, num_decoder_layers=1,
                                 dim_feedforward=16, num_feature_levels=6, two_stage_mask_invalid=mask_invalid)


def _logit(p):
    return math.log(p / (1 - p))


def test_two_stage_proposals_and_selection_as_the_official():
    """Level 0 is 2x3 and image 1 pads its last column; levels 1-5 are 1x1 with anchors 0.1 ... 1.6 wide."""
    spatial_shapes = [[2, 3]] + [[1, 1]] * 5
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[1, [2, 5]] = True
    memory = torch.randn(2, 11, 8)
    t = _tiny_transformer(mask_invalid=False)
    output_memory, proposals, invalid = t.encoder_proposals(memory, padding, spatial_shapes)

    inf = float("inf")
    x0 = [_logit(c) for c in (1 / 6, 1 / 2, 5 / 6)]
    x1 = [_logit(0.25), _logit(0.75), inf]
    y = [_logit(0.25), _logit(0.75)]
    w0 = _logit(0.05)
    image0 = [[x0[i % 3], y[i // 3], w0, w0] for i in range(6)]
    image1 = [[x1[i % 3], y[i // 3], w0, w0] if i % 3 < 2 else [inf] * 4 for i in range(6)]
    coarse = [[0.0, 0.0, _logit(0.05 * 2 ** lvl), _logit(0.05 * 2 ** lvl)] for lvl in range(1, 5)] + [[inf] * 4]
    expected = torch.tensor([image0 + coarse, image1 + coarse])
    torch.testing.assert_close(proposals, expected)
    assert invalid.tolist() == [[False] * 10 + [True], [False, False, True, False, False, True] + [False] * 4 + [True]]
    zeroed = t.enc_output_norm(t.enc_output(torch.zeros(8)))
    torch.testing.assert_close(output_memory[1, 5], zeroed)
    torch.testing.assert_close(output_memory[0, 10], zeroed)

    # Token 5 of image 1 is padding yet scores highest: the official top-k takes it; the masked variant does not.
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.05, 1.0],
                           [0.1, 0.2, 0.3, 0.4, 0.5, 2.0, 0.7, 0.8, 0.9, 0.05, 1.5]])
    logits = torch.stack([scores, scores - 1], -1)
    assert t.select_queries(logits, invalid, 3).tolist() == [[10, 8, 7], [5, 10, 8]]
    assert _tiny_transformer(mask_invalid=True).select_queries(logits, invalid, 3).tolist() == [[8, 7, 6], [8, 7, 6]]


@pytest.mark.parametrize("mask_invalid", [False, True])
def test_padding_trains_with_finite_losses_either_way(mask_invalid):
    torch.manual_seed(0)
    # 500 queries > the 163 tokens of these images: every token is selected, the invalid ones included
    model, criterion, _ = build_model(tiny_args(two_stage_mask_invalid=mask_invalid, num_queries=500))
    assert model.transformer.two_stage_mask_invalid is mask_invalid
    model.train()
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.5, 0.6]])}]
    images = nested_tensor_from_tensor_list([torch.randn(3, 64, 96), torch.randn(3, 80, 48)])
    out = model(images, targets)
    # the official variant starts invalid tokens' boxes at sigmoid(+inf) = 1
    assert ((out["interm_outputs"]["pred_boxes"] == 1).all(-1).any()) is not mask_invalid
    losses = criterion(out, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    criterion.total_loss(losses).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache in tmp_path, and any download attempt fails as without network."""
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_imagenet_weights_come_from_the_torch_hub_cache(offline_hub):
    # torch.hub checks the hash in the file name only while downloading; a cached file is loaded as is,
    # so a file of our own under the exact name torchvision expects stands in for the real download.
    offline_hub.mkdir(parents=True)
    reference = torchvision.models.resnet18(weights=None)
    reference.bn1.running_mean.uniform_()
    torch.save(reference.state_dict(), offline_hub / "resnet18-f37072fd.pth")  # ResNet18_Weights.IMAGENET1K_V1
    # the official layout: frozen BN (no num_batches_tracked), and layer4 unused with two backbone levels
    model, _, _ = build_model(tiny_args(backbone_norm="frozen_bn", backbone_freeze_at=2, return_interm_indices=[1, 2]))
    assert not torch.equal(model.backbone[0].body.conv1.weight, reference.conv1.weight)
    message = load_pretrained_backbone(model, "imagenet")
    body = model.backbone[0].body
    assert torch.equal(body.conv1.weight, reference.conv1.weight)
    assert torch.equal(body.bn1.running_mean, reference.bn1.running_mean)
    assert torch.equal(body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert str(offline_hub / "resnet18-f37072fd.pth") in message and "IMAGENET1K_V1" in message


def test_imagenet_weights_offline_without_cache_is_a_clear_error(offline_hub):
    model, _, _ = build_model(tiny_args(backbone_weights="imagenet"))  # building never downloads
    with pytest.raises(ValueError) as error:
        load_pretrained_backbone(model, "imagenet")
    message = str(error.value)
    assert "\n" not in message
    assert "could not be downloaded (<urlopen error network unreachable>)" in message
    assert f"put the file at {offline_hub / 'resnet18-f37072fd.pth'} or set backbone_weights=/path/to/file.pth" in message


def test_backbone_weights_load_from_a_local_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    model, _, _ = build_model(tiny_args())
    before = model.backbone[0].body.conv1.weight.clone()
    assert load_pretrained_backbone(model, None) is None
    assert torch.equal(model.backbone[0].body.conv1.weight, before)
    assert "r18.pth" in load_pretrained_backbone(model, str(tmp_path / "r18.pth"))
    body = model.backbone[0].body
    assert torch.equal(body.conv1.weight, reference.conv1.weight)
    assert torch.equal(body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not fit the backbone"):
        load_pretrained_backbone(model, str(tmp_path / "wrong.pth"))
