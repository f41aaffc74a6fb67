"""mace_core: mass concept erasure (MACE) for Stable Diffusion 1.x, 2.x and SDXL.

The core knows nothing of ComfyUI, A1111 or Gradio; hosts reach it through `backend.Backend`.
"""

__version__ = "0.1.0"
