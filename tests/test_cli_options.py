"""The CLI's surface: every option has help, a short flag means one thing everywhere, fixed choices are enums
whose bad values are one error line, defaults do something, and ``ls`` / ``sweep aggregate`` read the registries."""

from __future__ import annotations

import inspect
from dataclasses import astuple
from typing import Annotated

import pytest
import typer

from melayer.cli import app
from melayer.cli.common import Dtype, Given, shared_options


def _commands(group=None, prefix=()):
    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if getattr(cmd, "commands", None):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_option_and_argument_has_help():
    missing = [f"{' '.join(path)} {param.name}" for path, cmd in _commands() for param in cmd.params
               if param.name != "help" and not (getattr(param, "help", None) or "").strip()]
    assert missing == []


def test_a_short_flag_means_one_option_everywhere():
    meaning: dict[str, set[str]] = {}
    for _, cmd in _commands():
        for param in cmd.params:
            longs = [o for o in param.opts if o.startswith("--")]
            for short in (o for o in param.opts if o.startswith("-") and not o.startswith("--")):
                meaning.setdefault(short, set()).update(longs)
    assert {s: sorted(v) for s, v in meaning.items() if len(v) != 1} == {}
    assert meaning["-n"] == {"--limit"} and meaning["-b"] == {"--batch-size"} and meaning["-m"] == {"--model"}


def test_fixed_choices_are_enums_with_the_same_values_everywhere():
    choices: dict[str, set[tuple[str, ...]]] = {}
    for path, cmd in _commands():
        for param in cmd.params:
            if param.name in ("select", "dtype", "chat", "method", "executor", "what") and (param.name != "method"
                                                                                       or path == ("finetune",)):
                kind = param.type_descriptor.annotation  # the enum typer builds the click choice from
                choices.setdefault(param.name, set()).add(tuple(m.value for m in kind))
    assert choices == {"select": {("activation", "weight")}, "dtype": {("float32", "bfloat16", "float16")},
                       "chat": {("auto", "on", "off")}, "method": {("sft", "dpo", "grpo")},
                       "executor": {("local", "slurm", "ray")}, "what": {("tasks", "archs", "methods")}}
    # and the library accepts each value the CLI offers
    from melayer.finetuning.config import DTYPES, METHODS
    from melayer.interventions.wemask import SELECT_RULES
    assert set(SELECT_RULES) == {"activation", "weight"} and set(METHODS) == {"sft", "dpo", "grpo"}
    assert set(DTYPES) == {"float32", "bfloat16", "float16"}


def test_shared_options_are_placed_by_the_layout_and_arrive_together():
    """A command built with shared_options: its own and the shared options in the layout's order, the shared ones
    handed over in one Given (the ones it does not take keep their defaults); a layout that names an unknown
    option or leaves out one of the command's own is refused when the command is defined."""
    from typer.testing import CliRunner

    seen: list[tuple[Given, int]] = []

    def command(given: Given, own: Annotated[int, typer.Option(help="its own")] = 3) -> None:
        seen.append((given, own))

    built = shared_options("dtype own model plots")(command)
    assert list(inspect.signature(built).parameters) == ["dtype", "own", "model", "plots"]
    one = typer.Typer()
    one.command()(built)
    result = CliRunner().invoke(one, ["--model", "m", "--own", "5", "--no-plots", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    [(given, own)] = seen
    assert (own, given.model, given.plots, given.dtype) == (5, "m", False, Dtype.bfloat16)
    assert given.prompts is None and given.report is False  # not taken: the defaults
    with pytest.raises(TypeError, match="'nope' is neither"):
        shared_options("own nope")(command)
    with pytest.raises(TypeError, match="leaves out own"):
        shared_options("model")(command)


@pytest.mark.parametrize("args,message", [
    (["scan", "--dtype", "fp8"], "'fp8' is not one of 'float32', 'bfloat16', 'float16'"),
    (["generate", "-p", "hi", "--wemask", "0.1", "--select", "random"], "'random' is not one of 'activation', 'weight'"),
    (["generate", "-p", "hi", "--chat", "yes"], "'yes' is not one of 'auto', 'on', 'off'"),
    (["finetune", "ppo"], "'ppo' is not one of 'sft', 'dpo', 'grpo'"),
    (["sweep", "spec.yaml", "--executor", "k8s"], "'k8s' is not one of 'local', 'slurm', 'ray'"),
    (["ls", "models"], "'models' is not one of 'tasks', 'archs', 'methods'"),
    (["scan", "--no-such-option"], "No such option: --no-such-option"),
    (["eval"], "Missing option '--task'"),
    (["generate", "-p", "hi", "-n", "3"], "No such option: -n"),
    (["weights", "gemma-3-270m"], "Got unexpected extra argument"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_bad_options_are_one_line_without_traceback(cli, monkeypatch, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = astuple(cli(*args))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("melayer: error: ") and message in lines[0], err
    assert "--help" in lines[0] and "Traceback" not in err + out
    assert list(tmp_path.iterdir()) == []


def test_no_command_prints_the_help(cli):
    code, out, err = astuple(cli())
    assert code == 2 and "Usage" in out and "ls" in out and "sweep" in out


def test_default_rates_mask_at_least_one_dim_on_both_shipped_models():
    from melayer.eval.compare import DEFAULT_RATES  # what compare runs without --rates / --method
    from melayer.models.lazy import open_weights

    rates = list(DEFAULT_RATES)
    assert "0,0.005,0.01,0.05" in next(p.help for p in typer.main.get_command(app).commands["compare"].params
                                       if p.name == "rates")
    for name in ("gemma-3-270m", "smollm2-135m"):
        hidden = open_weights(name).hidden_size
        assert hidden in (640, 576)
        assert all(int(r * hidden) >= 1 for r in rates if r > 0), (name, hidden, rates)


def test_ls_reads_the_registries(cli):
    from melayer.eval.tasks import REGISTRY
    from melayer.interventions.methods import METHODS
    from melayer.models.archmap import ARCHITECTURES

    for what, names in (("tasks", list(REGISTRY)), ("archs", list(ARCHITECTURES)), ("methods", list(METHODS))):
        code, out, err = astuple(cli("ls", what))
        lines = out.splitlines()
        assert code == 0 and err == ""
        assert [line.split()[0] for line in lines[1:]] == names
        assert lines[0].split()[0] == {"tasks": "task", "archs": "model_type", "methods": "method"}[what]


def test_sweep_runs_a_spec_by_default_and_aggregates_as_a_subcommand(cli, tmp_path, tiny_dir):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"models: [{tiny_dir}]\nruns:\n  - command: scan\n")
    short = cli("sweep", spec, "--dry-run", "-o", tmp_path / "a")
    long = cli("sweep", "run", spec, "--dry-run", "-o", tmp_path / "a")
    assert short == long and short.returncode == 0 and "1 cells" in short.stdout
    for args in (["sweep", "aggregate", tmp_path], ["aggregate", tmp_path]):  # the earlier spelling still works
        code, _, err = astuple(cli(*args))
        assert code == 2 and "not a sweep output directory" in err
    hidden = typer.main.get_command(app).commands["aggregate"]
    assert hidden.hidden
