"""llama.cpp's ``llama-server``, built here from the source pinned below, and how to start it.

The source comes from PyPI, the one registry with llama.cpp in it that these machines reach:
the ``llama-cpp-python`` sdist vendors a whole llama.cpp tree. Only the server is built (CMake
and Ninja, static libraries; no tests, examples, web UI or TLS), once per pinned version.

Invariants:

- The cache folder is ``<cache root>/llama-cpp-python-<VERSION>``; it holds the sdist, the
  unpacked ``llama.cpp`` tree, the CMake build tree and ``bin/llama-server``. The binary is
  copied there only after the build succeeded and the copy answered ``--version``: if it
  exists, it works, and nothing is built again.
- The source tree appears by a rename of a completely unpacked folder, the binary by a rename
  of a complete copy; a lock file beside each keeps two processes from making it at once.
- The build is for this machine's CPU (ggml's default, ``GGML_NATIVE``): the cache is this
  machine's and is not meant to be copied to another.
- Every step has a timeout; a missing compiler, CMake or Ninja, a failed download or a failed
  compile raises :class:`~scripts.engine.cache.EngineUnavailable` with a one-line reason.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

from scripts.engine import cache, gguf_model

VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"
_SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
_TREE = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"

DOWNLOAD_TIMEOUT_S = 900.0  # pip also prepares the sdist's metadata (a minute here)
CONFIGURE_TIMEOUT_S = 300.0
BUILD_TIMEOUT_S = 3600.0  # about 8 to 15 minutes on two cores
CHECK_TIMEOUT_S = 30.0

# Per request slot: a 1,500-token prompt and a long answer fit, with room to spare.
DEFAULT_SLOT_CONTEXT = 4096
DEFAULT_PARALLEL = 2

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary to copy into the cache
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    # The web UI: neither built with npm nor fetched prebuilt (that download is on by default
    # and would reach a host these machines cannot).
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",  # loopback HTTP only; libcurl is no longer used by this version
    "-DGGML_CCACHE=OFF",
)


def home() -> Path:
    """This version's cache folder."""
    return cache.root() / f"{PACKAGE}-{VERSION}"


def binary_path() -> Path:
    return home() / "bin" / "llama-server"


def source_dir() -> Path:
    return home() / "llama.cpp"


def vocab_path(progress: cache.Progress = cache.say) -> Path:
    """The vocab-only GGUF the models take their tokenizer from (the source is fetched first)."""
    path = fetch_source(progress) / "models" / gguf_model.VOCAB_FILE
    if not path.is_file():
        raise cache.EngineUnavailable(f"{gguf_model.VOCAB_FILE} is not in {path.parent}")
    return path


def model(name: str, progress: cache.Progress = cache.say) -> Path:
    """The GGUF file of the model called ``name`` (one of ``gguf_model.SPECS``), made once."""
    spec = gguf_model.SPECS.get(name)
    if spec is None:
        known = ", ".join(sorted(gguf_model.SPECS))
        raise cache.EngineUnavailable(f"unknown model {name!r} (known: {known})")
    return gguf_model.make(spec, vocab_path(progress), progress)


def fetch_source(progress: cache.Progress = cache.say) -> Path:
    """The llama.cpp tree of the pinned sdist: downloaded with pip and unpacked, once."""
    tree = source_dir()
    if (tree / "CMakeLists.txt").is_file():
        return tree
    folder = home()
    with cache.locked(folder / "source.lock", "llama.cpp source"):
        if (tree / "CMakeLists.txt").is_file():
            return tree
        sdist = folder / "download" / _SDIST
        if not sdist.is_file():
            progress(f"llama.cpp: downloading {PACKAGE}=={VERSION} (sdist, about 77 MB)")
            cache.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--disable-pip-version-check",
                    "--dest",
                    str(sdist.parent),
                    f"{PACKAGE}=={VERSION}",
                ],
                step=f"downloading {PACKAGE}=={VERSION}",
                log_path=folder / "download.log",
                timeout_s=DOWNLOAD_TIMEOUT_S,
            )
            if not sdist.is_file():
                raise cache.EngineUnavailable(f"pip download left no {_SDIST} in {sdist.parent}")
        progress("llama.cpp: unpacking the vendored source")
        _unpack(sdist, tree)
    return tree


def _unpack(sdist: Path, tree: Path) -> None:
    """Unpack the sdist's llama.cpp folder into ``tree``, which appears whole or not at all."""
    staging = cache.partial(tree.parent / "unpack")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(_TREE)]
            if not members:
                raise cache.EngineUnavailable(f"{sdist.name} holds no {_TREE}")
            archive.extractall(staging, members=members, filter="data")
    except (OSError, tarfile.TarError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise cache.EngineUnavailable(f"cannot unpack {sdist}: {exc}") from None
    os.replace(staging / _TREE, tree)
    shutil.rmtree(staging, ignore_errors=True)


def _ninja() -> str:
    """Ninja from PATH, else the one ``pip install ninja`` put beside this Python."""
    found = shutil.which("ninja")
    if found:
        return found
    beside = Path(sys.executable).parent / "ninja"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise cache.EngineUnavailable(
        "ninja not found on PATH nor beside this Python (needed to build llama-server: "
        "pip install ninja, or apt-get install ninja-build)"
    )


def build(progress: cache.Progress = cache.say) -> Path:
    """``llama-server`` of the pinned version, built if the cache has none; its path."""
    binary = binary_path()
    if binary.is_file():
        return binary
    # The tools first: a machine without them fails at once, before a long download.
    cmake = cache.require_tool("cmake", "build llama-server (apt-get install cmake)")
    cache.require_tool("c++", "compile llama-server (apt-get install g++)", "g++", "clang++")
    cache.require_tool("cc", "compile llama-server (apt-get install gcc)", "gcc", "clang")
    ninja = _ninja()
    tree = fetch_source(progress)
    folder = home()
    with cache.locked(folder / "build.lock", "llama-server build"):
        if binary.is_file():
            return binary
        build_dir = folder / "build"
        log = folder / "build.log"
        started = time.monotonic()
        progress(f"llama-server: configuring (log: {log})")
        cache.run(
            [
                cmake,
                "-S",
                str(tree),
                "-B",
                str(build_dir),
                "-G",
                "Ninja",
                f"-DCMAKE_MAKE_PROGRAM={ninja}",
                *CMAKE_FLAGS,
            ],
            step="configuring llama.cpp",
            log_path=log,
            timeout_s=CONFIGURE_TIMEOUT_S,
        )
        jobs = str(os.cpu_count() or 1)
        progress(f"llama-server: compiling on {jobs} cores (minutes; log: {log})")
        cache.run(
            [cmake, "--build", str(build_dir), "--target", "llama-server", "-j", jobs],
            step="compiling llama-server",
            log_path=log,
            timeout_s=BUILD_TIMEOUT_S,
        )
        built = build_dir / "bin" / "llama-server"
        if not built.is_file():
            raise cache.EngineUnavailable(f"the build succeeded but left no {built}")
        binary.parent.mkdir(parents=True, exist_ok=True)
        made = cache.partial(binary)
        shutil.copy2(built, made)
        cache.run(
            [str(made), "--version"],
            step="checking the built llama-server",
            log_path=log,
            timeout_s=CHECK_TIMEOUT_S,
        )
        cache.publish(made, binary)
        progress(f"llama-server: built in {time.monotonic() - started:.0f} s: {binary}")
    return binary


def server_command(
    binary: Path,
    model_path: Path,
    *,
    port: int,
    alias: str,
    host: str = "127.0.0.1",
    parallel: int = DEFAULT_PARALLEL,
    slot_context: int = DEFAULT_SLOT_CONTEXT,
    threads: int | None = None,
) -> list[str]:
    """The command line of one ``llama-server``: ``parallel`` request slots of
    ``slot_context`` tokens each, served as ``alias``, with its ``/metrics`` and ``/slots``."""
    command = [
        str(binary),
        "--host",
        host,
        "--port",
        str(port),
        "--model",
        str(model_path),
        # /v1/models lists the alias, not the file's path: a stable name to route by.
        "--alias",
        alias,
        "--parallel",
        str(parallel),
        # Without --kv-unified (off when --parallel is given) the context is split evenly
        # between the slots: each gets slot_context tokens.
        "--ctx-size",
        str(parallel * slot_context),
        "--metrics",
        "--slots",
        "--no-webui",
    ]
    if threads is not None:
        command += ["--threads", str(threads)]
    return command
