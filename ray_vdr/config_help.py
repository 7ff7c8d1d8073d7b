"""The config schema rendered for people: the sections each command reads, and every field of a section with its
type, default and description (``ray-vdr config --show [SECTION]``, and the epilog of each command's ``--help``).

Everything is read from the pydantic models in :mod:`ray_vdr.config` (``model_fields``), so the help cannot drift
from the schema that validates the YAML.
"""

from __future__ import annotations

import json
import textwrap
import types
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ray_vdr.config import ConfigError, VDRConfig

ALL_SECTIONS = tuple(VDRConfig.model_fields)

# The top-level sections each command reads (the job's own section first). `config` and `demo` read all of them.
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "config": ALL_SECTIONS,
    "demo": ALL_SECTIONS,
    "make-data": ("synthetic",),
    "build-model": ("model",),
    "make-training-data": ("queries", "mine", "index", "model", "scaling"),
    "train": ("train", "model", "data", "scaling", "run", "output"),
    "embed": ("index", "model", "output", "data", "scaling", "run"),
    "delete": ("index",),
    "compact": ("index",),
    "mine": ("mine", "index", "model", "data", "scaling", "run"),
    "train-reranker": ("reranker", "mine", "data", "scaling", "run"),
    "evaluate": ("evaluate", "model", "reranker", "data", "output", "scaling", "run"),
    "serve": ("serve", "index", "reranker", "data", "run"),
    "benchmark": ("benchmark", "model", "reranker", "index", "train", "scaling", "run"),
    "promote": ("promote", "serve", "index", "model", "output", "data", "scaling", "run"),
}

OVERRIDE_SYNTAX = ("override a field on the command line with its dotted name, section.field=value "
                   "(e.g. train.lr=1e-4 serve.auth.keys_file=keys.yaml); values parse as YAML: 1e-4, true, null, "
                   "[64, 32]")

_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="), (annotated_types.Lt, "lt", "<"),
           (annotated_types.Le, "le", "<="))


def _constraints(metadata: list[Any]) -> list[str]:
    """Bounds and patterns pydantic keeps as field metadata (``Field(gt=0)``, ``PositiveInt``, ``pattern=``)."""
    out = []
    for m in metadata:
        if isinstance(m, FieldInfo):  # `Annotated[int, Field(gt=0)]` inside a union or a list
            out += _constraints(m.metadata)
        for cls, attr, sign in _BOUNDS:
            if isinstance(m, cls):
                out.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "pattern", None):
            out.append(f"pattern {m.pattern}")
    return out


def type_name(tp: Any, metadata: list[Any] | None = None) -> str:
    """A type annotation as a user reads it: ``int (> 0) | None``, ``'ddp' | 'deepspeed'``, ``list[int (> 0)]``;
    a nested model is a ``section`` (its fields are listed under its dotted name)."""
    bounds = _constraints(metadata or [])
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        name = type_name(args[0], list(args[1:]))
    elif origin is Literal:
        name = " | ".join(json.dumps(a) if isinstance(a, str) else str(a) for a in args)
    elif origin in (Union, types.UnionType):
        name = " | ".join(type_name(a) for a in args)
    elif origin is not None:
        name = f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    elif tp is type(None):
        name = "None"
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        name = "section"
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name} ({', '.join(bounds)})" if bounds else name


def _model_of(tp: Any) -> type[BaseModel] | None:
    """The nested section a field holds (``ServeAuthConfig``, or ``SourceConfig | None``), else None."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        models = [a for a in get_args(tp) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def default_text(field: FieldInfo, limit: int = 80) -> str | None:
    """The default as it would be written in YAML (``null``, ``true``, ``"ray-vdr"``, ``[64, 32]``); None for a
    required field and for a section, whose fields carry their own defaults."""
    if field.default_factory is not None:
        if _model_of(field.annotation) is not None:
            return None
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return None
    else:
        value = field.default
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fields(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, FieldInfo]]:
    """(dotted name, field) for every field under ``model``, nested sections after the field that holds them."""
    for name, field in model.model_fields.items():
        dotted = f"{prefix}.{name}"
        yield dotted, field
        if (sub := _model_of(field.annotation)) is not None:
            yield from _fields(sub, dotted)


def _lookup(path: str) -> tuple[type[BaseModel] | None, FieldInfo]:
    """The section model and the field a dotted ``path`` names; ConfigError listing the valid names otherwise."""
    model: type[BaseModel] | None = VDRConfig
    field: FieldInfo | None = None
    seen: list[str] = []
    for part in path.split("."):
        if model is None or part not in model.model_fields:
            where = ".".join(seen)
            valid = ", ".join(model.model_fields) if model is not None else ""
            if not seen:
                raise ConfigError(f"unknown config section {part!r}; the sections are: {valid}")
            if model is None:
                raise ConfigError(f"{where} is a field, not a section: it has no {part!r}")
            raise ConfigError(f"{where} has no field {part!r}; its fields are: {valid}")
        field = model.model_fields[part]
        seen.append(part)
        model = _model_of(field.annotation)
    assert field is not None  # path.split(".") is never empty
    return model, field


def _render_field(dotted: str, field: FieldInfo, width: int) -> str:
    head = f"{dotted}: {type_name(field.annotation, field.metadata)}"
    default = default_text(field)
    if default is not None:
        head += f" = {default}"
    elif field.is_required():
        head += " (required)"
    body = textwrap.fill(field.description or "", width=width, initial_indent="    ", subsequent_indent="    ")
    return f"{head}\n{body}" if body.strip() else head


def show(section: str = "", width: int = 110) -> str:
    """``ray-vdr config --show [SECTION]``: without a section, the sections with their descriptions and the commands
    that read them; with one (``serve``, or a nested ``serve.auth``), each of its fields by dotted name."""
    if not section:
        readers = {s: [c for c, secs in COMMAND_SECTIONS.items() if s in secs and secs != ALL_SECTIONS]
                   for s in ALL_SECTIONS}
        lines = ["config sections (`ray-vdr config --show SECTION` lists a section's fields):"]
        for name, field in VDRConfig.model_fields.items():
            lines.append(f"  {name:<10} {field.description}")
            lines.append(f"  {'':<10} read by: {', '.join(readers[name])}")
        return "\n".join([*lines, "", textwrap.fill(OVERRIDE_SYNTAX, width=width)]) + "\n"
    model, field = _lookup(section)
    out = [_render_field(section, field, width)]
    if model is not None:
        out += [_render_field(d, f, width) for d, f in _fields(model, section)]
    return "\n".join([*out, "", textwrap.fill(OVERRIDE_SYNTAX, width=width)]) + "\n"


def command_epilog(command: str) -> str:
    """The end of ``ray-vdr COMMAND --help``: the config sections the command reads, one line each, and where their
    fields are listed."""
    sections = COMMAND_SECTIONS[command]
    described = VDRConfig.model_fields
    lines = [f"  {s:<10} {described[s].description}" for s in sections]
    return "\n".join([
        "config sections this command reads:", *lines, "",
        "each section's fields (type, default, description): ray-vdr config --show SECTION",
        "override a field: SECTION.FIELD=VALUE, nested by dots (e.g. serve.auth.keys_file=keys.yaml)",
    ])
