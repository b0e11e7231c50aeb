"""build_model(args) -> (model, criterion, postprocessors), the entry point main.py and the tools use;
load_pretrained_backbone(model, spec) fills the backbone with ImageNet or local weights (training from scratch)."""
from .dino.backbone import build_backbone, load_pretrained_backbone
from .dino.criterion import SetCriterion, build_weight_dict
from .dino.dino import DINO
from .dino.matcher import HungarianMatcher
from .dino.postprocess import PostProcess
from .dino.transformer import DeformableTransformer


def build_model(args):
    if args.hidden_dim % args.nheads != 0:
        raise ValueError(f"hidden_dim ({args.hidden_dim}) must be divisible by nheads ({args.nheads})")
    backbone = build_backbone(args)
    if args.num_feature_levels < len(backbone.num_channels):
        raise ValueError(f"num_feature_levels ({args.num_feature_levels}) is smaller than the number of backbone "
                         f"levels selected by return_interm_indices ({len(backbone.num_channels)})")
    transformer = DeformableTransformer(
        d_model=args.hidden_dim, nhead=args.nheads, num_queries=args.num_queries,
        num_encoder_layers=args.enc_layers, num_decoder_layers=args.dec_layers,
        dim_feedforward=args.dim_feedforward, dropout=args.dropout, activation=args.transformer_activation,
        num_feature_levels=args.num_feature_levels, enc_n_points=args.enc_n_points, dec_n_points=args.dec_n_points,
        two_stage_mask_invalid=args.two_stage_mask_invalid)
    model = DINO(backbone, transformer, num_classes=args.num_classes, num_queries=args.num_queries,
                 num_feature_levels=args.num_feature_levels, dn_number=args.dn_number if args.use_dn else 0,
                 dn_label_noise_ratio=args.dn_label_noise_ratio, dn_box_noise_scale=args.dn_box_noise_scale,
                 dn_labelbook_size=args.dn_labelbook_size)
    matcher = HungarianMatcher(args.set_cost_class, args.set_cost_bbox, args.set_cost_giou, args.focal_alpha)
    weight_dict = build_weight_dict(args.cls_loss_coef, args.bbox_loss_coef, args.giou_loss_coef,
                                    args.interm_loss_coef, args.dec_layers, args.use_dn)
    criterion = SetCriterion(args.num_classes, matcher, weight_dict, args.focal_alpha, args.dec_layers, args.cls_loss)
    postprocessors = {"bbox": PostProcess(args.num_select, args.nms_iou_threshold)}
    return model, criterion, postprocessors
from .inference import Detector, load_detector  # noqa: E402  (after build_model, which it uses)
