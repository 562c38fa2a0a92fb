"""``melayer rigidity``."""

from __future__ import annotations

from pathlib import Path

from melayer.cli import app
from melayer.cli.common import Given, OutputOpt, run_analysis, shared_options


@app.command()
@shared_options("model prompts output n_prompts_ batch_size dtype arch device_map max_memory plots report")
def rigidity(given: Given, output: OutputOpt = Path("out/rigidity")) -> None:
    """Rigidity of the massive token, cross-input invariance, diversity of attention inputs -> DIR/rigidity.json + PNG."""
    from melayer.analysis.rigidity import DEFAULT_PROMPTS
    from melayer.analysis.rigidity import rigidity as run_rigidity

    n, texts = given.texts(DEFAULT_PROMPTS)
    run_analysis("rigidity", output, given,
                 lambda lm: run_rigidity(lm, texts, n_prompts=n, batch_size=given.batch_size))
