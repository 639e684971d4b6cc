"""The CLI, the YAML pipeline and the Python API share one set of options per command.

Each writing command builds its API options dataclass from its own parameters (``options_from``),
and the pipeline reads that dataclass's fields: a CLI option missing from the dataclass would be
silently dropped, and a dataclass field missing from the CLI would be reachable from YAML only.
"""

import dataclasses
import inspect

import pytest
import typer

from moecompress.api import CompressExpertsOptions, HealOptions, MergeOptions, PruneOptions, QuantizeOptions, StatsOptions
from moecompress.cli.common import RUNNER_OWNED
from moecompress.cli.main import app
from moecompress.pipeline.schema import PASSES

COMMANDS = {
    "quantize": QuantizeOptions,
    "prune": PruneOptions,
    "merge": MergeOptions,
    "stats": StatsOptions,
    "compress-experts": CompressExpertsOptions,
    "heal": HealOptions,
}
CLI_ONLY = {"stats": {"as_json"}}  # printing, not an option of the job


def _cli_params(command: str) -> dict[str, object]:
    info = next(i for i in app.registered_commands if i.name == command)
    params = inspect.signature(inspect.unwrap(info.callback)).parameters
    out = {}
    for name, p in params.items():
        default = p.default.default if isinstance(p.default, (typer.models.OptionInfo, typer.models.ArgumentInfo)) else p.default
        out[name] = default
    return out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_options_are_exactly_the_api_fields_with_the_same_defaults(command):
    cli = {k: v for k, v in _cli_params(command).items() if k not in RUNNER_OWNED and k not in CLI_ONLY.get(command, set())}
    fields = {f.name: f.default for f in dataclasses.fields(COMMANDS[command])}
    assert set(cli) == set(fields), (set(cli) ^ set(fields))
    required = {k for k, v in cli.items() if v is ...}  # typer.Option(...) = required on the CLI
    for name, default in cli.items():
        if name not in required:
            assert default == fields[name], f"{command} --{name.replace('_', '-')}: CLI default {default!r} != API default {fields[name]!r}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_pipeline_pass_reads_the_same_dataclass(command):
    assert PASSES[command.replace("-", "_")].options is COMMANDS[command]
