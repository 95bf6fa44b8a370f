"""Multi-scale deformable attention: the one seam between the model and the kernels."""
from dino.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch"]
