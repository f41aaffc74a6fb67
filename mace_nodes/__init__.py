"""ComfyUI node pack of mace (MACE concept erasure): nodes in `nodes`, the core's seam over ComfyUI's
MODEL / CLIP / VAE in `backend`. ComfyUI modules are imported lazily (inside functions), so importing
this package needs only ``mace_core`` and torch."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
