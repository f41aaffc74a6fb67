"""``python -m sd_webui_extension --model PATH``: the MACE tab as a standalone Gradio app.

Serves on 127.0.0.1 (``--listen``: all interfaces) port 7861; erased checkpoints are written next
to the model (or to ``--out-dir``), projects to ``<out-dir>/mace/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sd_webui_extension",
                                 description="The MACE concept-erasure tab as a standalone web app.")
    ap.add_argument("--model", required=True, help="a .safetensors / .ckpt checkpoint (SD 1.x, 2.x, SDXL)")
    ap.add_argument("--out-dir", help="where erased checkpoints are written (default: the model's folder)")
    ap.add_argument("--projects-dir", help="where erasure projects live (default: OUT_DIR/mace)")
    ap.add_argument("--port", type=int, default=7861, help="port (default 7861)")
    ap.add_argument("--listen", action="store_true", help="serve on all interfaces, not only 127.0.0.1")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... or auto (cuda when available)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("diffusers", "transformers", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model = Path(args.model)
    if not model.is_file():
        print(f"error: model file not found: {model}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

    from . import ensure_core_path

    ensure_core_path()
    from .host import StandaloneHost
    from .ui import build_ui

    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    host = StandaloneHost(model, out_dir, args.projects_dir, device=args.device)
    demo = build_ui(host)
    demo.queue()
    host_name = "0.0.0.0" if args.listen else "127.0.0.1"
    print(f"MACE: serving on http://{host_name}:{args.port} (outputs in {host.checkpoint_folder()})", flush=True)
    demo.launch(server_name=host_name, server_port=args.port, share=False, inbrowser=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
