"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from melayer.util.errors import MelayerError

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="gemma-3-270m (default), smollm2-135m, a HF dir, a .gguf file or a hub id")]
PromptOpt = Annotated[Optional[str], typer.Option("--prompt", "-p", help="a single prompt")]
PromptsOpt = Annotated[Optional[Path], typer.Option("--prompts", help="a text file, one prompt per line")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="output directory")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 (default), bfloat16 or float16")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="architecture-map override: a mapped family name or a JSON file of role -> module path")]


def prompts_from(prompt: str | None, prompts: Path | None) -> list[str] | None:
    from melayer.analysis.scan import read_prompts

    if prompt is not None and prompts is not None:
        raise MelayerError("give --prompt or --prompts, not both")
    if prompt is not None:
        if not prompt.strip():
            raise MelayerError("empty prompt: --prompt must contain text")
        return [prompt]
    if prompts is not None:
        return read_prompts(str(prompts))
    return None


def check_output(path: Path) -> Path:
    """Fail before any work if --output cannot become a directory (it is created when results are written)."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "exists and is not a directory" if existing == path else f"is inside {existing}, which is a file"
        raise MelayerError(f"--output {path} {what}")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise MelayerError(f"--output {path}: {existing} is not writable")
    return path
