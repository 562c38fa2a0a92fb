"""The Python API at the package root: one verb per command, with full signatures and docstrings, the result
classes and every error type; ``import melayer`` and the commands that need no model stay free of torch."""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import fields

import pytest

import melayer

VERBS = ["load", "from_model", "scan", "explain", "rigidity", "sinks", "weights", "wemask", "evaluate", "compare",
         "finetune", "sweep", "report", "read", "trace"]
# a variadic parameter the verb documents (not a hidden pass-through)
VARIADIC = {"report": "sources", "evaluate": "task_options", "compare": "task_options"}


@pytest.mark.parametrize("name", VERBS)
def test_each_verb_is_a_function_with_a_full_signature_and_google_docstring(name):
    fn = getattr(melayer, name)
    assert inspect.isfunction(fn) and name in melayer.__all__
    params = inspect.signature(fn).parameters
    variadic = [p.name for p in params.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert variadic == ([VARIADIC[name]] if name in VARIADIC else [])
    doc = inspect.getdoc(fn)
    assert "Args:" in doc and "Returns:" in doc
    args = doc.split("Args:", 1)[1].split("Returns:")[0]  # Args and, when there, Keyword Args (`name (type): ...`)
    config_fields = {f.name for f in fields(melayer.FinetuneConfig)} if name == "finetune" else set()
    for p in set(params) - config_fields:  # finetune's options are FinetuneConfig's fields, documented there
        assert f"{p}:" in args or f"{p} (" in args, f"melayer.{name}: parameter {p!r} is not documented"


def test_load_takes_every_option_of_the_models_layers_load():
    """melayer.load is the models layer's load plus the adapter: its signature is derived, so no option drops out."""
    from melayer.models.loading import load as base

    assert list(inspect.signature(melayer.load).parameters) == [*inspect.signature(base).parameters, "adapter",
                                                                "adapter_mask"]


def test_finetune_signature_lists_every_config_field():
    params = inspect.signature(melayer.finetune).parameters
    assert {f.name for f in fields(melayer.FinetuneConfig)} <= set(params)


def test_results_and_errors_are_exported():
    for name in ["ScanResult", "ExplainResult", "RigidityResult", "SinkResult", "WeightsResult", "EvalResult",
                 "CompareResult", "FinetuneResult", "SweepResult"]:
        cls = getattr(melayer, name)
        assert inspect.isclass(cls) and hasattr(cls, "to_dict") and name in melayer.__all__
    for name in ["MelayerError", "UnsupportedArchitecture", "NumericOverflow", "Interrupted"]:
        assert issubclass(getattr(melayer, name), BaseException) and name in melayer.__all__
    assert issubclass(melayer.UnsupportedArchitecture, melayer.MelayerError)
    assert {n for n in dir(melayer) if not n.startswith("_")} == set(melayer.__all__)  # no helper names


def test_importing_the_machinery_never_replaces_a_verb():
    import melayer.eval
    import melayer.finetuning
    import melayer.reporting
    import melayer.sweeps

    assert melayer.sweep is melayer.sweeps.run
    assert melayer.report is melayer.reporting.html
    assert melayer.finetune is melayer.finetuning.finetune
    assert melayer.evaluate is melayer.eval.run and melayer.compare is melayer.eval.compare.compare


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        melayer.nonexistent  # noqa: B018


def test_import_help_and_report_help_do_not_import_torch():
    code = ("import sys, melayer, melayer.cli\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner()\n"
            "for args in (['--help'], ['report', '--help'], ['scan', '--help']):\n"
            "    assert r.invoke(melayer.cli.app, args).exit_code == 0, args\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_one_registry_names_every_result_kind_and_its_rendering():
    from melayer.reporting.page import FILES
    from melayer.reporting.results import KINDS, _resolve

    for name, kind in KINDS.items():
        cls = kind.result_class()
        assert cls.kind == name and cls.schema().startswith(f"melayer.{name}/") and kind.file == f"{name}.json"
        assert getattr(melayer, cls.__name__) is cls  # every result class is at the package root
        for draw, file in kind.figures:
            assert callable(_resolve(draw))
            assert file.endswith(".png")
    assert set(FILES.values()) == {k for k, v in KINDS.items() if v.sections}  # the report reads the same table
