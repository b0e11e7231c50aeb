"""The detector: official key compatibility, output structure, losses that learn, odd sizes and edge cases."""
import itertools
import json
from pathlib import Path

import pytest
import torch

from models import build_model
from models.dino.denoising import cdn_attention_mask, prepare_for_cdn
from models.dino.matcher import HungarianMatcher
from util.misc import nested_tensor_from_tensor_list
from tiny import official_args, tiny_args

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dino4scale_r50_keys.json"


def _targets(*box_counts, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in box_counts:
        centers = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=g),
                        "boxes": torch.cat([centers, sizes], 1)})
    return targets


def _images(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nested_tensor_from_tensor_list([torch.randn(3, h, w, generator=g) for h, w in sizes])


@pytest.fixture(scope="module")
def official_model():
    return build_model(official_args())[0]


def test_official_dino_4scale_r50_state_dict_matches_reference(official_model):
    reference = json.loads(REFERENCE.read_text())
    model = official_model
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {k: shape for k, shape, _ in reference["state_dict"]}
    assert ours == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == reference["trainable_parameter_count_unique"]
    assert sum(p.numel() for p in model.parameters()) == reference["total_parameter_count_unique"]
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(reference["requires_grad_false_parameters"])
    # shared heads: one tensor under every alias, so an official checkpoint loads strictly
    sd = model.state_dict()
    for group in reference["alias_groups"]:
        assert all(sd[k].data_ptr() == sd[group[0]].data_ptr() for k in group)
    assert model.load_state_dict(sd, strict=True)


def test_official_key_and_parameter_order(official_model):
    """Optimizer states are positional (param groups built from named_parameters()): an official optimizer
    state only lines up if the parameters come in the official order."""
    reference = json.loads(REFERENCE.read_text())
    official_keys = [k for k, _, _ in reference["state_dict"]]
    assert list(official_model.state_dict()) == official_keys
    later_aliases = {k for group in reference["alias_groups"] for k in group[1:]}
    parameter_names = {n for n, _ in official_model.named_parameters(remove_duplicate=False)}
    expected = [k for k in official_keys if k in parameter_names and k not in later_aliases]
    assert [n for n, _ in official_model.named_parameters()] == expected
    # the shared heads come first under transformer.decoder.*; their top-level aliases are skipped
    assert expected[0] == "transformer.level_embed" and expected[-1].startswith("backbone.0.body.layer4.")


def test_train_outputs_have_every_part_with_the_right_shapes():
    torch.manual_seed(0)
    args = tiny_args()
    model, criterion, _ = build_model(args)
    model.train()
    out = model(_images((64, 80), (48, 64)), _targets(3, 1))
    assert out["pred_logits"].shape == (2, 20, 5) and out["pred_boxes"].shape == (2, 20, 4)
    assert len(out["aux_outputs"]) == args.dec_layers - 1
    assert out["aux_outputs"][0]["pred_boxes"].shape == (2, 20, 4)
    assert out["interm_outputs"]["pred_logits"].shape == (2, 20, 5)
    meta = out["dn_meta"]
    assert meta["num_dn_group"] == 6 // 3 and meta["pad_size"] == 2 * 2 * 3
    assert meta["output_known_lbs_bboxes"]["pred_boxes"].shape == (2, 12, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    losses = criterion(out, _targets(3, 1))
    assert set(criterion.weight_dict) == set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_eval_has_no_denoising_and_postprocess_scales_to_image_size():
    model, _, post = build_model(tiny_args(num_select=7))
    model.eval()
    with torch.no_grad():
        out = model(_images((64, 64)), _targets(2))
    assert "dn_meta" not in out
    results = post["bbox"](out, torch.tensor([[200, 100]]))
    assert results[0]["boxes"].shape == (7, 4) and results[0]["scores"].shape == (7,)
    assert results[0]["boxes"][:, 0::2].max() <= 100 and results[0]["boxes"][:, 1::2].max() <= 200
    assert (results[0]["scores"][:-1] >= results[0]["scores"][1:]).all()


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args())
    model.train()
    images, targets = _images((64, 64), (64, 64)), _targets(2, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        loss = criterion.total_loss(criterion(model(images, targets), targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert all(torch.isfinite(torch.tensor(history)))
    assert min(history[-3:]) < 0.8 * history[0], history


def test_batches_without_boxes_and_with_padding_do_not_crash():
    model, criterion, _ = build_model(tiny_args())
    model.train()
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    out = model(_images((64, 96), (80, 48)), empty)
    assert "dn_meta" not in out
    loss = criterion.total_loss(criterion(out, empty))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.label_enc.weight.grad is not None  # still in the graph, so DDP does not hang
    mixed = _targets(0, 4)
    loss = criterion.total_loss(criterion(model(_images((64, 96), (80, 48)), mixed), mixed))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("hidden_dim,nheads,levels,indices", [(30, 3, 3, [2, 3]), (40, 5, 4, [1, 2, 3]),
                                                              (64, 8, 5, [0, 1, 2, 3])])
def test_any_width_layers_and_levels_work(hidden_dim, nheads, levels, indices):
    args = tiny_args(hidden_dim=hidden_dim, nheads=nheads, num_feature_levels=levels, return_interm_indices=indices,
                     enc_layers=2, dec_layers=3, num_queries=500, num_select=300)
    model, criterion, post = build_model(args)
    model.train()
    targets = _targets(2)
    out = model(_images((64, 64)), targets)  # 500 queries > tokens of a 64 px image: clamped
    assert torch.isfinite(criterion.total_loss(criterion(out, targets)))
    model.eval()
    with torch.no_grad():
        res = post["bbox"](model(_images((64, 64))), torch.tensor([[64, 64]]))
    assert len(res[0]["scores"]) == min(300, out["pred_logits"].shape[1] * 5)


@pytest.mark.parametrize("norm,freeze,frozen", [("frozen_bn", 2, {"conv1", "layer1"}),  # FrozenBN: buffers only
                                               ("gn", 1, {"conv1", "bn1"}), ("bn", 0, set())])
def test_backbone_norms_and_freezing(norm, freeze, frozen):
    model, _, _ = build_model(tiny_args(backbone_norm=norm, backbone_freeze_at=freeze))
    assert {n.split(".")[2] for n, p in model.backbone.named_parameters() if not p.requires_grad} == frozen


def test_timm_backbone():
    pytest.importorskip("timm")
    model, _, _ = build_model(tiny_args(backbone="timm:resnet18", return_interm_indices=[2, 3, 4],
                                        num_feature_levels=4))
    model.eval()
    with torch.no_grad():
        out = model(_images((64, 64)))
    assert out["pred_boxes"].shape == (1, 20, 4)


def test_matcher_is_optimal_against_brute_force():
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    g = torch.Generator().manual_seed(1)
    for trial in range(10):
        nq, nt = 5, int(torch.randint(1, 5, (1,), generator=g))
        outputs = {"pred_logits": torch.randn(1, nq, 3, generator=g),
                   "pred_boxes": torch.cat([torch.rand(1, nq, 2, generator=g) * 0.5 + 0.25,
                                            torch.rand(1, nq, 2, generator=g) * 0.3 + 0.05], -1)}
        targets = _targets(nt, num_classes=3, seed=trial)
        (rows, cols), = matcher(outputs, targets)
        # recompute the cost matrix independently from the matcher's own formula
        p = outputs["pred_logits"][0].sigmoid()[:, targets[0]["labels"]]
        cls = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p ** 2 * -(1 - p + 1e-8).log()
        from torchvision.ops import box_convert, generalized_box_iou
        pb, tb = outputs["pred_boxes"][0], targets[0]["boxes"]
        cost = 2 * cls + 5 * torch.cdist(pb, tb, p=1) - 2 * generalized_box_iou(
            box_convert(pb, "cxcywh", "xyxy"), box_convert(tb, "cxcywh", "xyxy"))
        best = min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(nq), nt))
        assert len(rows) == nt and len(set(rows.tolist())) == nt
        assert cost[rows, cols].sum() == pytest.approx(float(best), abs=1e-5)


def test_varifocal_scores_learn_the_iou_of_their_box():
    """cls_loss "varifocal": the matched class's loss is flat where its score equals its box's IoU with the ground
    truth, other classes and queries are pushed down with weight 0.75 p^2, and the weights follow VarifocalNet."""
    from models.dino.criterion import SetCriterion, varifocal_loss
    target = torch.tensor([[0.0, 0.8]])
    assert varifocal_loss(torch.zeros(1, 2), target).item() == pytest.approx((0.75 * 0.25 + 0.8) * 0.6931472, 1e-5)
    box, gt = torch.tensor([0.5, 0.5, 0.2, 0.2]), torch.tensor([0.55, 0.5, 0.2, 0.2])  # IoU 0.15 / 0.25 = 0.6
    criterion = SetCriterion(3, HungarianMatcher(2.0, 5.0, 2.0), {}, 0.25, 1, cls_loss="varifocal")
    for score, sign in ((0.6, 0), (0.9, 1), (0.3, -1)):
        logits = torch.full((1, 2, 3), -3.0)
        logits[0, 0, 1] = torch.logit(torch.tensor(score))
        logits.requires_grad_(True)
        outputs = {"pred_logits": logits, "pred_boxes": torch.stack([box, torch.tensor([0.2, 0.2, 0.1, 0.1])])[None]}
        targets = [{"labels": torch.tensor([1]), "boxes": gt[None]}]
        criterion.single_output_losses(outputs, targets, [(torch.tensor([0]), torch.tensor([0]))], 1.0)[
            "loss_ce"].backward()
        grad = logits.grad[0, 0, 1].item()
        assert (abs(grad) < 1e-6) if sign == 0 else (grad * sign > 1e-3), (score, grad)
        assert (logits.grad[0, 1] > 0).all() and (logits.grad[0, 0, [0, 2]] > 0).all()
    with pytest.raises(ValueError, match="cls_loss must be one of focal, varifocal"):
        SetCriterion(3, HungarianMatcher(), {}, 0.25, 1, cls_loss="softmax")


def test_cdn_attention_mask_structure():
    mask = cdn_attention_mask(pad_size=8, group_size=4, num_queries=3)
    assert mask.shape == (11, 11)
    assert mask[8:, :8].all()  # matching queries never see DN queries
    assert not mask[8:, 8:].any() and not mask[:8, 8:].any()
    assert not mask[:4, :4].any() and not mask[4:8, 4:8].any()  # a group sees itself
    assert mask[:4, 4:8].all() and mask[4:8, :4].all()  # and no other group


def test_cdn_queries_positive_negative_layout():
    torch.manual_seed(0)
    targets = _targets(2, 1)
    emb = torch.nn.Embedding(6, 8)
    dn = prepare_for_cdn(targets, dn_number=4, label_noise_ratio=0.0, box_noise_scale=0.4, num_classes=5,
                         num_queries=10, hidden_dim=8, label_enc=emb)
    assert dn["dn_meta"] == {"pad_size": 8, "num_dn_group": 2}
    boxes = dn["query_bbox"].sigmoid()
    # image 0, group 0: positives in slots 0-1 stay close, negatives in slots 2-3 are pushed further away
    gt = targets[0]["boxes"]
    pos_err = (boxes[0, 0:2] - gt).abs().max()
    neg_err = (boxes[0, 2:4] - gt).abs().max()
    assert pos_err < neg_err
    torch.testing.assert_close(dn["query_label"][0, 0], emb(targets[0]["labels"][0]))
    assert (dn["query_label"][1, 1] == 0).all()  # image 1 has one box: slot 1 is padding
    assert prepare_for_cdn([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}], 4, 0.5, 0.4,
                           5, 10, 8, emb) is None
