"""The MACE tab for AUTOMATIC1111 / Forge, and the same page as a standalone Gradio app.

A thin adapter over ``mace_core``: the host (A1111, Forge or the standalone server) is reached
through `host.Host`; what the buttons do lives in `actions` (no Gradio there); `ui` builds the
Gradio Blocks. Importing this package imports neither Gradio, torch nor the web UI.
"""

from __future__ import annotations

import sys
from pathlib import Path

__version__ = "0.1.0"

EXTENSION_ROOT = Path(__file__).resolve().parent.parent
SHARED = EXTENSION_ROOT / "shared"


def ensure_core_path() -> None:
    """Make ``mace_core`` importable when the repository is used in place (A1111's extension
    folder, a clone run with ``python -m sd_webui_extension``) rather than pip-installed."""
    try:
        import mace_core  # noqa: F401
    except ImportError:
        if SHARED.is_dir() and str(SHARED) not in sys.path:
            sys.path.append(str(SHARED))
