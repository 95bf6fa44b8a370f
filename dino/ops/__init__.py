"""Multi-scale deformable attention: the one seam between the model and the kernels.

Importing this package registers the custom ops ``dino::ms_deform_attn`` and ``dino::ms_deform_attn_backward``.
"""
from dino.ops.ms_deform_attn import (
    ms_deform_attn,
    ms_deform_attn_pytorch,
    path_name,
    use_custom_op,
    use_pytorch_path,
)
from dino.ops import custom_op as _custom_op  # noqa: F401  (registers the torch.library ops)
from dino.ops.kernel import kernel_available

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch", "path_name", "use_custom_op", "use_pytorch_path",
           "kernel_available"]
