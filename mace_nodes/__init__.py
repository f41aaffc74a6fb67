"""ComfyUI node pack of mace (MACE concept erasure): nodes in `nodes` (ComfyUI's V3 schema), the core's
seam over ComfyUI's MODEL / CLIP / VAE in `backend`. ComfyUI registers the pack through
`comfy_entrypoint`; ``nodes`` (which needs ComfyUI's ``comfy_api``) is imported only then, and
`backend` imports ComfyUI modules inside its functions, so importing this package needs only
``mace_core`` and torch."""


async def comfy_entrypoint():
    """ComfyUI's V3 entry point (``custom_nodes/<pack>/__init__.py`` exports it): the node pack."""
    from .nodes import MaceExtension

    return MaceExtension()


__all__ = ["comfy_entrypoint"]
