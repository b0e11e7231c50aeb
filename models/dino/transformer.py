"""Deformable encoder/decoder with DINO's two-stage (mixed) query selection and look-forward-twice refinement."""
from typing import List, Optional

import torch
from torch import Tensor, nn

from util.misc import inverse_sigmoid
from ..ops import MSDeformAttn
from .layers import DecoderLayer, EncoderLayer, MLP
from .position_encoding import box_sine_embedding


def _valid_ratios(mask: Tensor) -> Tensor:
    """(N, H, W) padding mask -> (N, 2) fraction of the width and height that is image."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


def _grid_centers(h: int, w: int, device) -> Tensor:
    """Pixel centres of an (h, w) map as (h*w, 2) xy in pixels."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                            torch.arange(w, dtype=torch.float32, device=device) + 0.5, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)


class Encoder(nn.Module):
    def __init__(self, layers: List[EncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def reference_points(spatial_shapes: List[List[int]], valid_ratios: Tensor) -> Tensor:
        """Every pixel centre of every level, normalised by the valid (unpadded) extent: (N, S, L, 2)."""
        refs = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            centers = _grid_centers(h, w, valid_ratios.device) / torch.tensor([w, h], device=valid_ratios.device)
            refs.append(centers[None] / valid_ratios[:, None, lvl])
        return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, spatial_shapes, valid_ratios, padding_mask):
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class Decoder(nn.Module):
    """Refines boxes layer by layer; `bbox_embed`/`class_embed` are the detector's shared heads, set by DINO."""

    def __init__(self, layers: List[DecoderLayer], d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None

    def forward(self, tgt, refpoints_unsigmoid, memory, spatial_shapes, valid_ratios, memory_padding_mask,
                self_attn_mask):
        """Returns the normalised outputs of every layer and the (undetached) box each layer started from."""
        reference = refpoints_unsigmoid.sigmoid()
        references, outputs = [reference], []
        output = tgt
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        for lid, layer in enumerate(self.layers):
            reference_input = reference.detach()[:, :, None] * ratios
            query_pos = self.ref_point_head(box_sine_embedding(reference_input[:, :, 0], self.d_model // 2))
            output = layer(output, query_pos, reference_input, memory, spatial_shapes, memory_padding_mask,
                           self_attn_mask)
            outputs.append(self.norm(output))
            if lid < len(self.layers) - 1:
                # The undetached box feeds the next layer's prediction (look forward twice); the next
                # layer's sampling uses it detached.
                reference = (self.bbox_embed[lid](output) + inverse_sigmoid(reference.detach())).sigmoid()
                references.append(reference)
        return outputs, references


class DeformableTransformer(nn.Module):
    """two_stage_mask_invalid=False selects queries as the official DINO: the top-k encoder tokens by class
    score, padding and border tokens included (their proposals are +inf, so boxes of 1.0); True never selects
    them while valid tokens remain (score -inf, proposal 0)."""

    def __init__(self, d_model=256, nhead=8, num_queries=900, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.0, activation="relu", num_feature_levels=4, enc_n_points=4,
                 dec_n_points=4, two_stage_mask_invalid=False):
        super().__init__()
        self.d_model, self.num_queries = d_model, num_queries
        self.two_stage_mask_invalid = two_stage_mask_invalid
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.encoder = Encoder([EncoderLayer(d_model, dim_feedforward, dropout, activation, num_feature_levels,
                                             nhead, enc_n_points) for _ in range(num_encoder_layers)])
        self.decoder = Decoder([DecoderLayer(d_model, dim_feedforward, dropout, activation, num_feature_levels,
                                             nhead, dec_n_points) for _ in range(num_decoder_layers)], d_model)
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_out_bbox_embed: Optional[nn.Module] = None  # set by DINO: copies of its prediction heads
        self.enc_out_class_embed: Optional[nn.Module] = None
        self._reset_parameters()

    def _reset_parameters(self):
        """As the official: xavier for every matrix (tgt_embed included), then each attention's own
        initialisation, then level_embed ~ N(0, 1)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def encoder_proposals(self, memory: Tensor, padding_mask: Tensor, spatial_shapes: List[List[int]]):
        """One anchor box per memory token (its pixel, size 0.05 * 2^level); tokens in padding or whose box
        leaves (0.01, 0.99) are invalid: their memory is zeroed and their proposal (logits) is +inf, or 0 with
        two_stage_mask_invalid. Returns projected memory, proposals and the invalid mask."""
        proposals, start = [], 0
        for lvl, (h, w) in enumerate(spatial_shapes):
            mask_l = padding_mask[:, start:start + h * w].view(-1, h, w)
            valid_wh = torch.stack([(~mask_l[:, 0, :]).sum(1), (~mask_l[:, :, 0]).sum(1)], -1).float()
            centers = _grid_centers(h, w, memory.device)[None] / valid_wh[:, None]
            wh = torch.full_like(centers, 0.05 * 2.0 ** lvl)
            proposals.append(torch.cat([centers, wh], -1))
            start += h * w
        proposals = torch.cat(proposals, 1)
        invalid = padding_mask | ~((proposals > 0.01) & (proposals < 0.99)).all(-1)
        fill = 0.0 if self.two_stage_mask_invalid else float("inf")
        proposals = inverse_sigmoid(proposals).masked_fill(invalid[..., None], fill)
        output_memory = self.enc_output_norm(self.enc_output(memory.masked_fill(invalid[..., None], 0.0)))
        return output_memory, proposals, invalid

    def select_queries(self, enc_logits: Tensor, invalid: Tensor, k: int) -> Tensor:
        """Indices (N, k) of the encoder tokens with the highest class score."""
        scores = enc_logits.max(-1)[0]
        if self.two_stage_mask_invalid:
            scores = scores.masked_fill(invalid, float("-inf"))
        return torch.topk(scores, k, dim=1)[1]

    def forward(self, srcs: List[Tensor], masks: List[Tensor], pos_embeds: List[Tensor],
                dn_query_label: Optional[Tensor] = None, dn_query_bbox: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None):
        spatial_shapes = [list(src.shape[-2:]) for src in srcs]  # a list: no device sync in any layer
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
        pos_flatten = torch.cat([pos.flatten(2).transpose(1, 2) + self.level_embed[lvl]
                                 for lvl, pos in enumerate(pos_embeds)], 1)
        valid_ratios = torch.stack([_valid_ratios(m) for m in masks], 1)

        memory = self.encoder(src_flatten, pos_flatten, spatial_shapes, valid_ratios, mask_flatten)

        output_memory, proposals, invalid = self.encoder_proposals(memory, mask_flatten, spatial_shapes)
        enc_logits = self.enc_out_class_embed(output_memory)
        enc_coords_unsig = self.enc_out_bbox_embed(output_memory) + proposals
        k = min(self.num_queries, memory.shape[1])
        topk = self.select_queries(enc_logits, invalid, k)
        refpoint_unsig = torch.gather(enc_coords_unsig, 1, topk[..., None].expand(-1, -1, 4))
        enc_tgt = torch.gather(output_memory, 1, topk[..., None].expand(-1, -1, self.d_model))

        tgt = self.tgt_embed.weight[None, :k].expand(memory.shape[0], -1, -1)
        refpoints = refpoint_unsig.detach()
        if dn_query_label is not None:
            tgt = torch.cat([dn_query_label, tgt], 1)
            refpoints = torch.cat([dn_query_bbox, refpoints], 1)
            attn_mask = attn_mask[: tgt.shape[1], : tgt.shape[1]]
        hs, references = self.decoder(tgt, refpoints, memory, spatial_shapes, valid_ratios, mask_flatten, attn_mask)
        return hs, references, enc_tgt, refpoint_unsig.sigmoid()
