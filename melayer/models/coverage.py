"""Which model types of the installed transformers melayer covers, and how (``melayer archs``).

Every model type of transformers' causal-LM auto mapping is built from its default config shrunk to tiny sizes,
its roles are mapped (:func:`melayer.models.derive.arch_for`) and a massive activation is planted through those
roles (:func:`melayer.testing.plant_massive`: an FFN neuron, or where no layer has an FFN, as in pure SSMs, a channel
of the mixer's output projection). ``validated``: the plant shows up exactly where it was put; ``mapped``: roles
derived but no layer has an FFN or a mixer output projection to plant through; ``excluded``: an encoder or encoder-decoder family;
``refused``: melayer cannot map the roles (the reason says why); ``not built``: transformers cannot build the
family from a shrunk default config (or it needs a package that is not installed); ``failed``: mapped, but the
plant did not come out right.
"""

from __future__ import annotations

from typing import Any

from melayer.util.errors import MelayerError


def causal_lm_types() -> list[str]:
    """Every model type in the installed transformers' causal-LM auto mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def encoder_types() -> set[str]:
    """Causal-LM model types that are encoder or encoder-decoder families (their causal-LM class is a BERT-style
    encoder run as a decoder, or the decoder half of a sequence-to-sequence model): the types transformers also
    maps to masked-LM or sequence-to-sequence heads. melayer does not study them."""
    from transformers.models.auto import modeling_auto as auto

    return (set(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
            | set(auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES))


ENCODER_REASON = "encoder or encoder-decoder family (transformers also maps it to a masked-LM or seq2seq head)"


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def coverage_row(model_type: str) -> dict[str, Any]:
    """One row of the coverage table (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from melayer.models.loading import from_model
    from melayer.models.shrink import tiny_config
    from melayer.testing import plant_found, plant_massive, tiny_tokenizer

    row: dict[str, Any] = {"model_type": model_type}
    if model_type in encoder_types():
        return {**row, "status": "excluded", "reason": ENCODER_REASON}
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32,
                                                 attn_implementation="eager")
    except Exception as exc:  # transformers' own errors for a config it cannot shrink or build
        return {**row, "status": "not built", "reason": _one_line(exc)}
    model.eval()  # dropout off, as melayer.load leaves a model
    row["class"] = type(model).__name__
    try:
        lm = from_model(model, tiny_tokenizer(), name=f"tiny-{model_type}")
    except MelayerError as exc:  # the table keeps the reason, not the advice on --arch
        return {**row, "status": "refused", "reason": str(exc).split(". Pass --arch")[0]}
    row.update(arch=lm.arch.name, block=lm.arch.block_kind(), roles=_roles(lm))
    if lm.arch.layer_paths:
        kinds = sorted({lm.arch.block_kind(i) for i in range(lm.num_layers)} - {row["block"]})
        row["layers_differ"] = "other layers: " + "; ".join(kinds) if kinds else "layers differ in module paths"
    inner = range(1, lm.num_layers - 1)
    with_ffn = [i for i in inner if lm.module(i, "down") is not None or lm.experts(i) is not None] or \
        [i for i in inner if lm.module(i, "mixer_out") is not None]  # no FFN anywhere (pure SSMs): through the mixer
    if not with_ffn:
        return {**row, "status": "mapped", "reason": "no FFN and no mixer output projection in the layers the plant "
                                                     "can use: roles derived, not validated by planting"}
    row["me_layer"] = with_ffn[0]
    try:
        plant = plant_massive(lm, me_layer=with_ffn[0], neuron=5, dim=7)
        problem = plant_found(lm, plant)
    except Exception as exc:
        return {**row, "status": "failed", "reason": _one_line(exc)}
    if problem:
        return {**row, "status": "failed", "reason": problem}
    return {**row, "status": "validated", "reason": ""}


def _roles(lm: Any) -> dict[str, str]:
    """Each role's module path in the first layer (model-level roles from the model), None roles left out."""
    from melayer.models.archmap import LAYER_ROLES, MODEL_ROLES

    out = {r: lm.arch.path(r) for r in MODEL_ROLES}
    out.update({r: lm.arch.path(r) for r in LAYER_ROLES})
    return {k: v for k, v in out.items() if v}


def coverage(model_types: list[str] | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """The coverage table: one row per model type (default: every causal-LM type of the installed transformers)."""
    import transformers

    from melayer.util.console import track

    known = causal_lm_types()
    unknown = [t for t in model_types or () if t not in known]
    if unknown:
        raise MelayerError(f"not a causal-LM model type of transformers {transformers.__version__}: "
                           f"{', '.join(unknown)}")
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return [coverage_row(t) for t in track(model_types or known, "building and planting", enabled=progress)]
    finally:
        transformers.logging.set_verbosity(level)


def coverage_markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown: model type, status, block kind, the main derived roles, the reason."""
    def cell(text: Any) -> str:
        return str(text or "").replace("|", "\\|").replace("\n", " ")

    out = ["| model type | status | block | mixer / FFN roles (first layer) | norms | why |", "|---|---|---|---|---|---|"]
    for r in rows:
        roles = r.get("roles", {})
        ffn = (f"router `{roles['router']}`, experts `{roles['experts']}`" if roles.get("experts") else
               f"down `{roles['down']}`" if roles.get("down") else
               f"mixer out `{roles['mixer_out']}`" if roles.get("mixer_out") else "")
        if roles.get("experts") and roles.get("down"):
            ffn += f", shared down `{roles['down']}`"
        main = ", ".join(p for p in (f"mixer `{roles['attn']}`" if roles.get("attn") else "", ffn) if p)
        norms = ", ".join(f"`{roles[k]}`" for k in ("pre_attn_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm")
                          if roles.get(k))
        block = r.get("block", "") + (f" ({r['layers_differ']})" if r.get("layers_differ") else "")
        out.append(f"| `{r['model_type']}` | {r['status']} | {cell(block)} | {cell(main)} | {cell(norms)} | "
                   f"{cell(r.get('reason', ''))} |")
    return "\n".join(out) + "\n"
