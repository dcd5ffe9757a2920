"""Key table of the UNet family (diffusers ``UNet2DConditionModel``).

The NNX module tree mirrors diffusers' attribute names (see jaxforget/models/unet.py), so the
generic rules of ``KeyTable`` (path joined by ".", kernel/scale -> weight, kernel transposes)
already give the diffusers key: no renames. One layout difference is handled generically by
``from_torch_layout``: SD2-style Linear ``proj_in``/``proj_out`` weights load into SD1-style 1x1
convolutions. The UNet state dict has no buffers, so nothing is ignored; original-SD
single-file checkpoints (``model.diffusion_model.*``) are a different layout, not aliased here.
"""

from __future__ import annotations

from jaxforget.io.weights import KeyTable

UNET_KEYS = KeyTable(name="unet")
