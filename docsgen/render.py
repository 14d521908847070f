"""The generated reference pages, as Markdown: settings (every pydantic-settings model), the
`wis2-chain` commands (walked from its Typer app), the dataset description's fields (from its
JSON schema) and the Prometheus metrics (from the registries)."""

from __future__ import annotations

import inspect
import json
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from docsgen.discover import REPO, metrics, settings_models, shipped

GENERATED_NOTE = ("*Generated from the code when the site is built (`docsgen/`): "
                  "never edit it by hand.*\n")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def type_name(annotation: Any) -> str:
    """A short, readable name for a field's type (`Path | None`, `list[str]`, `'tcp' | ...`)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        text = str(value)
        for root, shown in ((str(REPO), "."), (str(Path.home()), "~")):
            if text == root or text.startswith(root + "/"):
                text = shown + text[len(root):]
        return text
    return value


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    value = _plain(value)
    return f"`{json.dumps(value) if isinstance(value, list | dict) else value}`"


@dataclass(frozen=True)
class SettingRow:
    model: str  # module.Class
    field: str  # path in the model, e.g. mqtt.host
    env: str  # environment variable(s)
    type: str
    default: str
    description: str | None


def _env_names(model: type[BaseSettings], name: str, field: FieldInfo) -> list[str]:
    prefix = model.model_config.get("env_prefix", "")
    alias = field.validation_alias or field.alias
    if isinstance(alias, str):
        return [alias.upper()]
    choices = getattr(alias, "choices", None)
    if choices:
        return [c.upper() for c in choices if isinstance(c, str)]
    return [f"{prefix}{name}".upper()]


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if inspect.isclass(annotation) and issubclass(annotation, BaseModel) \
        else None


def setting_rows(model: type[BaseSettings]) -> list[SettingRow]:
    """One row per setting; a nested model's fields (env_nested_delimiter) each get their own."""
    qualname = f"{model.__module__}.{model.__qualname__}"
    delimiter = model.model_config.get("env_nested_delimiter")
    rows: list[SettingRow] = []
    for name, field in model.model_fields.items():
        env = _env_names(model, name, field)
        nested = _nested_model(field.annotation)
        if nested is not None and delimiter:
            for sub, subfield in nested.model_fields.items():
                rows.append(SettingRow(
                    qualname, f"{name}.{sub}", f"{env[0]}{delimiter}{sub}".upper(),
                    type_name(subfield.annotation), default_text(subfield),
                    subfield.description))
            continue
        rows.append(SettingRow(qualname, name, ", ".join(env), type_name(field.annotation),
                               default_text(field), field.description))
    return rows


def settings_page() -> str:
    lines = ["# Settings", "", GENERATED_NOTE,
             "Every process reads its settings from environment variables and from a `.env` "
             "file in its working directory (see `.env.example`); names are case-insensitive. "
             "Secrets are `SecretStr`: never logged, shown here as `**********`. A list or an "
             "object is given as JSON. Prefect's own settings (`PREFECT_API_URL`, "
             "`PREFECT_API_AUTH_STRING`...) are described in Prefect's documentation.", ""]
    for model in settings_models():
        summary = (inspect.getdoc(model) or "").split("\n\n")[0].replace("\n", " ")
        where = "" if shipped(model) else " (not shipped: the demo, tests and bench)"
        lines += [f"## `{model.__name__}`", "", f"`{model.__module__}`{where}. {summary}", "",
                  "| variable | type | default | description |", "| --- | --- | --- | --- |"]
        for row in setting_rows(model):
            lines.append(f"| `{row.env}` | {_cell(row.type)} | {_cell(row.default)} | "
                         f"{_cell(row.description or '**no description**')} |")
        lines.append("")
    return "\n".join(lines)


# The Typer app's commands are read through click's interface (Typer >= 0.24 carries its own copy
# of click, so nothing here checks classes: a group has `commands`, an argument's
# param_type_name is "argument").
def _is_argument(param: Any) -> bool:
    return param.param_type_name == "argument"


def _param_type(param: Any) -> str:
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None and getattr(descriptor, "annotation", None) is not None:
        return type_name(descriptor.annotation)
    return getattr(getattr(param, "type", None), "name", "")


def _param_row(param: Any) -> str:
    if _is_argument(param):
        name = f"`{param.name.upper()}`"
    else:
        name = ", ".join(f"`{o}`" for o in (*param.opts, *param.secondary_opts))
    default = param.default
    if param.required:
        shown = "required"
    elif callable(default) or default is None:
        shown = "—"
    elif getattr(param, "is_flag", False) and param.secondary_opts:
        shown = f"`{param.opts[0] if default else param.secondary_opts[0]}`"
    else:
        shown = f"`{_plain(default)}`"
    kind = "flag" if getattr(param, "is_flag", False) else _param_type(param)
    help_text = getattr(param, "help", None) or ""
    return f"| {name} | {_cell(kind)} | {_cell(shown)} | {_cell(help_text)} |"


def _commands(group: Any, path: list[str]) -> list[tuple[list[str], Any]]:
    found: list[tuple[list[str], Any]] = []
    for name, command in group.commands.items():
        if command.hidden:
            continue
        found.append(([*path, name], command))
        if hasattr(command, "commands"):
            found += _commands(command, [*path, name])
    return found


def cli_page() -> str:
    import typer.main

    from cli.main import app

    root = typer.main.get_command(app)
    lines = ["# The `wis2-chain` command", "", GENERATED_NOTE,
             f"{root.help or ''}. Every command takes `--help`.", "",
             "| global option | type | default | help |", "| --- | --- | --- | --- |",
             *(_param_row(p) for p in root.params
               if p.name not in ("help", "install_completion", "show_completion")), ""]
    for path, command in _commands(root, []):
        title = " ".join(path)
        params = [p for p in command.params if p.name != "help"]
        usage = " ".join(p.name.upper() for p in params if _is_argument(p))
        lines += [f"## `wis2-chain {title}`", ""]
        if hasattr(command, "commands"):
            lines += [f"{command.help or ''}: `wis2-chain {title} COMMAND`.", ""]
            continue
        lines += [f"```\nwis2-chain {title}{' ' + usage if usage else ''} [OPTIONS]\n```", "",
                  inspect.cleandoc(command.help or ""), ""]
        if params:
            lines += ["| argument / option | type | default | help |",
                      "| --- | --- | --- | --- |", *(_param_row(p) for p in params), ""]
    return "\n".join(lines)


def _schema_type(prop: dict[str, Any] | bool) -> str:
    if isinstance(prop, bool):  # `additionalProperties: true` (e.g. dict[str, Any])
        return "any"
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " | ".join(_schema_type(p) for p in prop["anyOf"])
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    kind = prop.get("type", "any")
    if kind == "array":
        return f"array of {_schema_type(prop.get('items', {}))}"
    if kind == "object" and "additionalProperties" in prop:
        return f"object of {_schema_type(prop['additionalProperties'])}"
    return str(kind)


def schema_rows(schema: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(field, type, required or default, constraints, description) of a JSON schema object."""
    required = set(schema.get("required", ()))
    rows = []
    for name, prop in schema.get("properties", {}).items():
        default = "required" if name in required else (
            f"`{json.dumps(prop['default'])}`" if "default" in prop else "—")
        constraints = ", ".join(f"{k} `{prop[k]}`" for k in
                                ("pattern", "minimum", "maximum", "minLength", "maxLength")
                                if k in prop)
        rows.append((name, _schema_type(prop), default, constraints,
                     prop.get("description", "")))
    return rows


def dataset_page() -> str:
    from wis2.dataset import DatasetDescription

    schema = DatasetDescription.model_json_schema()
    lines = ["# Dataset description fields", "", GENERATED_NOTE,
             "A dataset is described by a JSON file in `WIS2_DATASETS_DIR` (`data/datasets/` by "
             "default), validated against this model (`wis2.dataset.DatasetDescription`). "
             "How to write one: [Publishing a new dataset](../datasets/index.md).", "",
             inspect.cleandoc(schema.get("description", "")), "",
             "| field | type | default | constraints | description |",
             "| --- | --- | --- | --- | --- |"]
    fields = DatasetDescription.model_fields
    lines += [f"| `{n}` | {_cell(t)} | {_cell(default_text(fields[n]) if d == '—' else d)} | "
              f"{_cell(c)} | {_cell(desc)} |" for n, t, d, c, desc in schema_rows(schema)]
    for name, sub in schema.get("$defs", {}).items():
        lines += ["", f"## `{name}`", "", "| field | type | default | constraints | "
                  "description |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| `{n}` | {_cell(t)} | {_cell(d)} | {_cell(c)} | {_cell(desc)} |"
                  for n, t, d, c, desc in schema_rows(sub)]
    lines += ["", "The JSON schema itself:", "", "```json", json.dumps(schema, indent=2), "```",
              ""]
    return "\n".join(lines)


_EXPOSED = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count"), "info": ("_info",)}


def metrics_page() -> str:
    lines = ["# Prometheus metrics", "", GENERATED_NOTE,
             "The metrics the chain's processes define, read from their registries. The "
             "listener serves its own on `http://<host>:<WIS2_LISTENER_METRICS_PORT>/metrics` "
             "(with `/healthz`); see [Keeping a node running](../operating/index.md).", "",
             "| metric (as exposed) | type | labels | meaning | defined in |",
             "| --- | --- | --- | --- | --- |"]
    for metric in metrics():
        names = ", ".join(f"`{metric.name}{s}`" for s in _EXPOSED.get(metric.kind, ("",)))
        labels = ", ".join(f"`{label}`" for label in metric.labels) or "—"
        lines.append(f"| {names} | {metric.kind} | {labels} | {_cell(metric.documentation)} | "
                     f"`{metric.owner}` |")
    lines.append("")
    return "\n".join(lines)


PAGES = {
    "reference/settings.md": settings_page,
    "reference/cli.md": cli_page,
    "reference/dataset.md": dataset_page,
    "reference/metrics.md": metrics_page,
}
