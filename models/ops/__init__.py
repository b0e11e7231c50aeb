from .ms_deform_attn import MSDeformAttn, multi_scale_deformable_attn

__all__ = ["MSDeformAttn", "multi_scale_deformable_attn"]
