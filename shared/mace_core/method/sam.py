"""Optional masks from segment-anything, prompted by the attention masks (``--mask sam``).

The attention mask of each training image gives a box (its bounding box) and a point (its
centroid); SAM, loaded from the checkpoint the user gives, turns them into a sharp mask. Needs the
`segment-anything` package (and torchvision); imported only when asked for.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MaceError
from .masks import ConceptData

_MODEL_TYPES = ("vit_h", "vit_l", "vit_b")


def _load(checkpoint: str, device: torch.device | str):
    """A SamPredictor on ``device`` with the weights of ``checkpoint`` (a state_dict; the model type
    is read from the file name, as in SAM's own file names)."""
    try:
        from segment_anything import SamPredictor, sam_model_registry
    except ImportError as e:
        raise MaceError(f"--mask sam needs the segment-anything package ({e}); install it with "
                        "`pip install segment-anything` (it needs torchvision), or use --mask attention") from None
    path = Path(checkpoint)
    if not path.is_file():
        raise MaceError(f"SAM checkpoint not found: {path}")
    kind = next((k for k in _MODEL_TYPES if k in path.name), None)
    if kind is None:
        raise MaceError(f"cannot tell the SAM model type from {path.name!r}; name the file with vit_h, vit_l or vit_b")
    sam = sam_model_registry[kind]()
    try:
        # weights_only: a checkpoint from the internet must not run code when it is read
        sam.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, TypeError, EOFError) as e:
        detail = " ".join(str(e).split())[:300] or type(e).__name__  # load_state_dict lists every key
        raise MaceError(f"{path.name} is not a SAM {kind} checkpoint (a state_dict of plain tensors): "
                        f"{detail}") from None
    return SamPredictor(sam.to(device).eval())


def refine_masks(data: ConceptData, checkpoint: str, vae_scale: int, device: torch.device | str) -> torch.Tensor:
    """bool [N, h, w] at latent size: SAM's mask for each image, prompted by its attention mask;
    an image whose attention mask is empty keeps the whole image. SAM runs on ``device`` (the
    model's: `--device cpu` must not put it on a GPU)."""
    predictor = _load(checkpoint, device)
    out = []
    for img, m in zip(data.images, data.masks):
        if not m.any():
            out.append(torch.ones_like(m))
            continue
        # prompts in image pixels (x, y): latent cell (y, x) covers pixels [x*s, (x+1)*s) x [y*s, (y+1)*s)
        ys, xs = np.nonzero(m.numpy())
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * vae_scale
        point = np.array([[xs.mean() + 0.5, ys.mean() + 0.5]]) * vae_scale
        predictor.set_image(img)  # uint8 [H, W, 3] RGB, as SAM wants
        masks, scores, _ = predictor.predict(point_coords=point, point_labels=np.array([1]), box=box,
                                             multimask_output=True)
        best = torch.from_numpy(masks[int(np.argmax(scores))]).float()[None, None]
        out.append(F.interpolate(best, size=m.shape, mode="area")[0, 0] >= 0.5)
    return torch.stack(out)
