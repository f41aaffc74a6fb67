"""ComfyUI entry point of this repository (clone it into ``ComfyUI/custom_nodes/``).

Only re-exports the node pack in ``mace_nodes/`` (its V3 ``comfy_entrypoint``; a module that also
exported NODE_CLASS_MAPPINGS would be loaded the V1 way); puts ``shared/`` (the ``mace_core`` package) on
sys.path first. Nothing from gradio or AUTOMATIC1111 is imported on this path.
"""

import os
import sys

_SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shared")
if os.path.isdir(_SHARED) and _SHARED not in sys.path:
    sys.path.insert(0, _SHARED)

from .mace_nodes import comfy_entrypoint  # noqa: E402

__all__ = ["comfy_entrypoint"]
