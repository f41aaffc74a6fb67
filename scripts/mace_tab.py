"""AUTOMATIC1111 / Forge entry point: adds the "MACE" tab.

The web UI imports every ``scripts/*.py`` of an extension with the extension folder on sys.path
only while importing, so the packages we need (``sd_webui_extension``, and ``mace_core`` from
``shared/``) are imported here, at load time; later imports of their submodules go through the
packages themselves.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "shared")):
    if os.path.isdir(_p) and _p not in sys.path:
        sys.path.append(_p)

import mace_core  # noqa: E402,F401  (imported now, while the paths above are on sys.path)
import sd_webui_extension  # noqa: E402,F401  (the same: the tab imports its modules later)
from modules import script_callbacks  # noqa: E402

_HOST = None


def _ensure_paths():
    # After A1111 restores its sys.path the packages stay importable through sys.modules; the
    # paths are re-added anyway for code that imports a top-level module lazily (e.g. toyworld).
    for p in (_ROOT, os.path.join(_ROOT, "shared")):
        if os.path.isdir(p) and p not in sys.path:
            sys.path.append(p)


def on_ui_tabs():
    global _HOST
    _ensure_paths()
    from sd_webui_extension.a1111 import A1111Host
    from sd_webui_extension.ui import ELEM_ID, TITLE, build_ui

    _HOST = A1111Host()
    return [(build_ui(_HOST), TITLE, ELEM_ID)]


script_callbacks.on_ui_tabs(on_ui_tabs)
