"""Command-line overrides checked against the schemas and the presets before Hydra composes them.

Hydra reports a mistyped key, a preset that does not exist or a value of the wrong type in its own
words, over several lines, without naming ramp's keys or presets. :meth:`ConfigShape.check` reads the
overrides with Hydra's own parser and refuses each such mistake with one :class:`ConfigError` naming
the key, the group it belongs to and the closest valid key or preset:

- a group option that is no preset (``model=gpt3``, or a schema's ConfigStore name such as
  ``model=model_schema``), with the presets and the closest one;
- a key no schema of its group declares (``optim.learning_rate``), with the closest key, or the
  option that declares it (``data.files`` needs ``data=text``); a group chosen in the same command
  decides which keys exist (``data=text data.files=...``);
- a value the key's type does not take (``train.max_steps=abc``), with the type;
- what Hydra's override grammar refuses in a typed config: removing a key (``~train.seed``), adding
  one that is already set, setting a new entry of a free mapping (``model.extra.*``) without ``+``,
  several values without ``-m``.

Hydra's own keys (``hydra.*``, ``hydra/...``) and packaged overrides (``group@pkg=...``) pass as they
are. The module imports no other part of ramp but its errors: :mod:`trainer.config` hands it the root
schema, each group's schemas by their ConfigStore names and the config folder (``conf_dir``).
"""

from __future__ import annotations

import difflib
import functools
import itertools
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import Field, dataclass, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError

if typing.TYPE_CHECKING:
    from hydra.core.override_parser.types import Glob, Override

ALIASES = {
    "learning_rate": "lr",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "max_iters": "max_steps",
    "num_steps": "max_steps",
    "steps": "max_steps",
    "num_train_epochs": "epochs",
    "block_size": "seq_len",
    "max_seq_len": "seq_len",
    "context_length": "seq_len",
    "grad_clip": "max_grad_norm",
    "gradient_clipping": "max_grad_norm",
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "n_embd": "hidden_size",
    "d_model": "hidden_size",
    "scheduler": "schedule",
    "lr_scheduler": "schedule",
}
"""Names other trainers (transformers, nanoGPT) use for a ramp key or group, for "did you mean" (looked
up without underscores: ``learningrate`` too)."""

HYDRA_FILE_OPTIONS = ("config_path", "config_name", "config_dir", "experimental_rerun")
"""Hydra options that change where the presets come from: the command is then left to Hydra."""


def closest(word: str, candidates: Sequence[str], cutoff: float = 0.6, n: int = 1) -> list[str]:
    """The candidates ``word`` most likely meant, best first: a known alias (:data:`ALIASES`), then the
    spelling (difflib, on the last dotted part and on the path below the group), then initials either
    way (``learning_rate``: ``lr``, ``wd``: ``weight_decay``). Dotted names are compared below their group."""

    def below(name: str) -> str:
        return name.partition(".")[2] if "." in word else name

    by_leaf: dict[str, list[str]] = {}
    by_path: dict[str, list[str]] = {}
    for candidate in candidates:
        by_leaf.setdefault(candidate.rsplit(".", 1)[-1].lower(), []).append(candidate)
        by_path.setdefault(below(candidate).lower(), []).append(candidate)
    leaf = word.rsplit(".", 1)[-1].lower()
    alias = {name.replace("_", ""): key for name, key in ALIASES.items()}.get(leaf.replace("_", ""))
    initials = _initials(leaf)
    if alias in by_leaf:
        found = by_leaf[alias]
    elif spelled := difflib.get_close_matches(below(word).lower(), list(by_path), n=n, cutoff=cutoff):
        found = [c for name in spelled for c in by_path[name]]
    elif spelled := difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=cutoff):
        found = [c for name in spelled for c in by_leaf[name]]
    elif len(initials) > 1 and initials in by_leaf:
        found = by_leaf[initials]
    else:  # the other way round: wd for weight_decay
        found = [c for name, cs in by_leaf.items() if "_" in name and _initials(name) == leaf for c in cs]
    return list(dict.fromkeys(found))[:3]


def _initials(name: str) -> str:
    return "".join(part[:1] for part in name.split("_"))


def _did_you_mean(found: Sequence[str]) -> str:
    return f"did you mean {' or '.join(found)}?" if found else ""


def _optional(hint: Any) -> tuple[Any, bool]:
    """The type without ``None``, and whether ``None`` is allowed."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return hint, hint is Any


def kind(hint: Any) -> str:
    """What a key of type ``hint`` takes, in words: ``an integer``, ``one of fp32, bf16``, ``a list``."""
    base, optional = _optional(hint)
    origin = typing.get_origin(base) or base
    if isinstance(origin, type) and issubclass(origin, Enum):
        words = "one of " + ", ".join(str(member.value) for member in origin)
    elif is_dataclass(origin):
        words = "its own keys"
    else:
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        names.update({list: "a list", dict: "a mapping"})
        words = names.get(origin, "a value")
    return f"{words}, or null" if optional and base is not Any else words


def _plain(value: Any) -> Any:
    """A parsed value with Hydra's quoted strings as plain strings."""
    from hydra.core.override_parser.types import QuotedString

    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    return value


def glob_of(override: Override) -> Glob | None:
    """The ``glob(...)`` a group override sweeps over its options, or None."""
    from hydra.core.override_parser.types import Glob

    value = override.value()
    return value if isinstance(value, Glob) else None


def values_of(override: Override) -> list[Any]:
    """The values an override sets: one, or each of a sweep's (none for ``interval()`` or ``glob()``,
    which list none themselves)."""
    if not override.is_sweep_override():
        return [override.value()]
    if not override.is_discrete_sweep() or glob_of(override) is not None:
        return []
    return [_plain(value) for value in override.sweep_iterator()]


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def parse(overrides: Sequence[str]) -> list[Override]:
    """Hydra's reading of the overrides.

    Raises:
        ConfigError: an override Hydra's grammar cannot read, named, with its first complaint.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except OverrideParseException as err:
            why = [text for text in str(err).splitlines() if not text.startswith(("See ", "Error parsing"))]
            raise ConfigError(
                f"{line}: Hydra cannot read this override ({'; '.join(why) or 'bad syntax'}); write it as "
                "key=value or group=preset (a list as key=[a,b], a value with commas or brackets in quotes: "
                "key='a,b')"
            ) from None
    return parsed


def command_overrides(argv: Sequence[str]) -> tuple[list[str], bool] | None:
    """The overrides of a ``trainer.main`` command line and whether it is a sweep (``-m``), read as Hydra
    reads them; None when Hydra's own options take the presets from elsewhere (``--config-dir``...) or
    the line is not Hydra's to run (Hydra reports that itself)."""
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(list(argv[1:]))
    except SystemExit:
        return None
    if any(getattr(args, option, None) for option in HYDRA_FILE_OPTIONS):
        return None
    if any(line.lstrip("+~").startswith("hydra.searchpath") for line in args.overrides):
        return None
    return list(args.overrides), bool(args.multirun)


@functools.lru_cache(maxsize=64)
def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    return loaded if isinstance(loaded, dict) else {}


def _leaf_paths(tree: dict[Any, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The path of every value in a nested mapping that is not itself a non-empty mapping."""
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaf_paths(value, (*prefix, str(name)))
        else:
            yield (*prefix, str(name))


def _has_path(tree: Any, path: Sequence[str]) -> bool:
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


@dataclass(frozen=True)
class Target:
    """Where a dotted key lands in a schema."""

    path: tuple[str, ...]
    """The declared field's dotted path from the group (``wandb.mode``)."""
    hint: Any
    """The declared field's type."""
    field: Field[Any] | None
    """The declared field (None: the group itself)."""
    below: tuple[str, ...] = ()
    """Parts past the declared field: entries of a free mapping (``extra.n_inner``) or a list's."""


@dataclass(frozen=True)
class ConfigShape:
    """What overrides are checked against: the root schema, the schemas each preset may extend, the
    config folder with the presets and the primary config."""

    root: type[Any]
    """The root schema: one field per group (``run``, ``train``, ``model``...)."""
    stored: Mapping[str, Mapping[str, type[Any]]]
    """The groups with presets, each with its schemas by ConfigStore name (``text_schema``)."""
    conf: Path
    """The config folder: ``config.yaml`` and one folder of presets per group."""

    def presets(self, group: str) -> list[str]:
        """The presets of a group: its YAML files, sorted (ConfigStore's ``*_schema`` entries are not)."""
        return sorted(path.stem for path in (self.conf / group).glob("*.yaml"))

    def default(self, group: str) -> str | None:
        """The group's option in the primary config's defaults list."""
        for entry in _read_yaml(self.conf / "config.yaml").get("defaults", []):
            if isinstance(entry, dict) and group in entry:
                return str(entry[group])
        return None

    def preset(self, group: str, option: str) -> dict[str, Any]:
        """What a preset's YAML sets (its defaults list left out)."""
        tree = dict(_read_yaml(self.conf / group / f"{option}.yaml"))
        tree.pop("defaults", None)
        return tree

    def schema(self, group: str, option: str | None) -> type[Any]:
        """The schema a group's preset extends (the ``*_schema`` its defaults list names); a group
        without presets, or a preset that names none, has the root's type for the group."""
        if option is not None and group in self.stored:
            for entry in _read_yaml(self.conf / group / f"{option}.yaml").get("defaults", []):
                if isinstance(entry, str) and entry in self.stored[group]:
                    return self.stored[group][entry]
        schema: type[Any] = typing.get_type_hints(self.root)[group]
        return schema

    def sections(self) -> list[str]:
        """Every top-level name: the groups with presets and the sections of keys (``run``, ``train``)."""
        return [declared.name for declared in fields(self.root)]

    def keys(self, group: str, schema: type[Any]) -> list[str]:
        """Every dotted key of a schema, nested schemas' keys and the nested schemas themselves included."""
        return list(_declared(schema, f"{group}."))

    def check(self, overrides: Sequence[str], multirun: bool = False) -> None:
        """Refuse the first override that names no key or preset, or sets a value its key does not take.

        Args:
            overrides: Hydra overrides as given on the command line.
            multirun: the command sweeps (``-m``), so an override may list several values.

        Raises:
            ConfigError: one line naming the key or group, what is wrong and the closest valid choice.
        """
        everything = parse(overrides)
        sampler = any(o.key_or_group == "hydra/sweeper" for o in everything)
        parsed = [o for o in everything if not o.is_hydra_override() and o.package is None]
        for override in parsed:
            if override.is_sweep_override() and not multirun:
                raise ConfigError(
                    f"{override.input_line} lists several values: add -m to run one job per value (a sweep); "
                    f"a key that takes a list takes it in brackets, {override.key_or_group}=[a,b]"
                )
            if override.is_interval_sweep() and not sampler:
                raise ConfigError(
                    f"{override.input_line}: a sweep over an interval needs a sweeper that samples it; list the "
                    f"values instead, e.g. {override.key_or_group}=1,2,3 or {override.key_or_group}=range(1,4)"
                )
        chosen = {group: self._options(group, parsed) for group in self.stored}
        for override in parsed:
            if override.key_or_group in self.stored:
                self._check_group(override, chosen[override.key_or_group])
        for override in parsed:
            if override.key_or_group not in self.stored:
                self._check_key(override, chosen)

    def jobs(self, overrides: Sequence[str], multirun: bool = False) -> list[list[str]]:
        """Each job's overrides, as Hydra's basic sweeper lists them: the command's own, or one list per
        point of a sweep (``-m``), a glob over a group's presets expanded over its preset files.

        Raises:
            ConfigError: an override Hydra cannot read.
        """
        if not multirun:
            return [list(overrides)]
        choices: list[list[str]] = []
        for override in parse(overrides):
            line = override.input_line or ""
            if not override.is_sweep_override():
                choices.append([line])
                continue
            glob = glob_of(override)
            if glob is not None:
                values = glob.filter(self.presets(override.key_or_group))
            else:
                values = list(override.sweep_string_iterator()) if override.is_discrete_sweep() else []
            choices.append([f"{override.get_key_element()}={value}" for value in values] or [line])
        return [list(job) for job in itertools.product(*choices)]

    def _options(self, group: str, parsed: Sequence[Override]) -> list[str]:
        """The options the command picks for a group (each of a sweep's), else the default one."""
        picked: list[str] | None = None
        for override in parsed:
            if override.key_or_group == group and not override.is_delete():
                glob = glob_of(override)
                picked = (
                    glob.filter(self.presets(group)) if glob else [_shown(v) for v in values_of(override)]
                )
        default = self.default(group)
        return picked if picked is not None else [default] if default else []

    def _check_group(self, override: Override, options: Sequence[str]) -> None:
        group, presets = override.key_or_group, self.presets(override.key_or_group)
        listed = ", ".join(presets)
        if override.is_delete():
            raise ConfigError(
                f"~{group} removes the {group} preset a run needs; pick another with {group}=<preset> "
                f"(one of {listed})"
            )
        glob = glob_of(override)
        if glob is not None:
            schemas = [name for name in glob.filter(list(self.stored[group])) if name not in presets]
            if schemas:
                raise ConfigError(
                    f"{override.input_line} also matches {', '.join(schemas)}, the schema the {group} presets "
                    f"extend, not a preset; leave it out, e.g. {group}=glob(*,exclude=*_schema)"
                )
        values = values_of(override)
        if any(value is None or isinstance(value, (dict, list)) for value in values):
            raise ConfigError(f"{group}= takes the name of a {group} preset: one of {listed}")
        for option in options:
            if option in presets:
                continue
            if option in self.stored[group]:
                raise ConfigError(
                    f"{group}={option} is the schema every {group} preset extends, not a preset; choose one of "
                    f"{listed}"
                )
            hint = _did_you_mean(closest(option, presets, cutoff=0.4, n=2))
            raise ConfigError(
                f"{group}={option} is not {'an' if group[0] in 'aeiou' else 'a'} {group} preset; choose one of {listed}"
                + (f" ({hint})" if hint else "")
            )

    def _check_key(self, override: Override, chosen: Mapping[str, Sequence[str]]) -> None:
        key = override.key_or_group
        group = key.partition(".")[0]
        if group not in self.sections():
            raise ConfigError(self._unknown_group(key, group))
        options: Sequence[str | None] = chosen.get(group) or [None]
        for option in options:
            schema = self.schema(group, option)
            target = self._target(key, group, option, schema)
            if target.field is None:
                for value in values_of(override):
                    self._check_value(key, group, option, schema, value)
            elif target.below:
                self._check_free(override, group, option, target)
            else:
                self._check_declared(override, group, option, target)

    def _unknown_group(self, key: str, group: str) -> str:
        """The message for a key whose first part is no group: the closest group, or the closest key."""
        sections = self.sections()
        if "." in key:
            found = closest(group, sections)
            fixed = [f"{name}.{key.partition('.')[2]}" for name in found]
            return f"{key}: {group} is not a group of ramp's config (groups: {', '.join(sections)}); " + (
                _did_you_mean(fixed) or "see python -m trainer.main --help"
            )
        every = [k for name in sections for k in self.keys(name, self.schema(name, self.default(name)))]
        found = closest(group, sections) or closest(group, every)
        return f"{key} is not a group or key of ramp's config; " + (
            _did_you_mean(found)
            or f"groups: {', '.join(sections)} (python -m trainer.main --help lists the keys)"
        )

    def _target(self, key: str, group: str, option: str | None, schema: type[Any]) -> Target:
        """Where ``key`` lands in ``schema``.

        Raises:
            ConfigError: no field of the schema (or of a nested one) is named so.
        """
        parts = key.split(".")[1:]
        current: type[Any] = schema
        for index, part in enumerate(parts):
            declared = {f.name: f for f in fields(current)}
            if part not in declared:
                raise ConfigError(self._unknown_key(key, group, option, schema))
            hint = typing.get_type_hints(current)[part]
            base, _ = _optional(hint)
            path = tuple(parts[: index + 1])
            if is_dataclass(base) and index + 1 < len(parts):
                current = base  # type: ignore[assignment]
                continue
            below = tuple(parts[index + 1 :])
            if below and not _is_container(base):
                raise ConfigError(
                    f"{key}: {group}.{'.'.join(path)} takes {kind(hint)}, not keys of its own; "
                    f"set {group}.{'.'.join(path)}=VALUE"
                )
            return Target(path, hint, declared[part], below)
        return Target((), schema, None)

    def _unknown_key(self, key: str, group: str, option: str | None, schema: type[Any]) -> str:
        """The message for a key the option's schema does not declare: the options that declare it, else
        the closest key of this option, else the closest key of another option and who declares it."""
        if self._has_option_schemas(group):
            where = f"{group}={option}"
        else:
            where = f"{group} ({group}={option})" if option is not None else group
        elsewhere = self._declaring(group, key)
        if elsewhere:
            return f"{key} is not a key of {where}; {_declared_by(group, elsewhere)}"
        found = closest(key, self.keys(group, schema))
        if found:
            return f"{key} is not a key of {where}; {_did_you_mean(found)}"
        others = [k for other in self.presets(group) for k in self.keys(group, self.schema(group, other))]
        found = closest(key, list(dict.fromkeys(others)))[:1]
        if found:
            return f"{key} is not a key of {where}; {_did_you_mean(found)} {_declared_by(group, self._declaring(group, found[0]))}"
        return f"{key} is not a key of {where}; python -m trainer.main --help lists the keys of {group}"

    def _declaring(self, group: str, key: str) -> list[str]:
        """The group's presets whose schema declares ``key``, in the order the schemas are registered."""
        order = list(self.stored.get(group, {}).values())
        found = [other for other in self.presets(group) if key in self.keys(group, self.schema(group, other))]
        schemas = {other: self.schema(group, other) for other in found}
        return sorted(
            found, key=lambda other: order.index(schemas[other]) if schemas[other] in order else len(order)
        )

    def _has_option_schemas(self, group: str) -> bool:
        """Whether a group's options extend different schemas (data, schedule, backend)."""
        return len(self.stored.get(group, {})) > 1

    def _check_declared(self, override: Override, group: str, option: str | None, target: Target) -> None:
        key = f"{group}.{'.'.join(target.path)}"
        assert target.field is not None
        if override.is_delete():
            _, optional = _optional(target.hint)
            raise ConfigError(
                f"~{key}: ramp's keys cannot be removed; set {key}=VALUE"
                + (" (or null)" if optional else "")
                + " instead"
            )
        current = self._current(group, option, target)
        values = values_of(override)
        line = override.input_line or ""
        if override.is_add() and current is not None and not isinstance(override.value(), (dict, list)):
            raise ConfigError(
                f"{line}: {key} already has a value ({_shown(current)}); drop the +: {line[1:]}"
            )
        if not override.is_add() and not override.is_force_add():
            self._check_new_entries(line, key, group, option, target, values)
        for value in values:
            self._check_value(key, group, option, self.schema(group, option), value)

    def _check_new_entries(
        self, line: str, key: str, group: str, option: str | None, target: Target, values: Sequence[Any]
    ) -> None:
        """A mapping given to a free mapping (``model.extra={n_inner: 64}``) without ``+`` may only set
        entries its preset has: Hydra merges it into a closed mapping.

        Raises:
            ConfigError: the first new entry, and the + that adds it.
        """
        base, _ = _optional(target.hint)
        if (typing.get_origin(base) or base) is not dict:
            return
        preset = self.preset(group, option) if option is not None and group in self.stored else {}
        for value in values:
            for entry in _leaf_paths(value) if isinstance(value, dict) else ():
                if not _has_path(preset, (*target.path, *entry)):
                    raise ConfigError(
                        f"{line}: {key}.{'.'.join(entry)} is not set by {group}={option}; add new entries "
                        f"with a +: +{line}"
                    )

    def _current(self, group: str, option: str | None, target: Target) -> Any:
        """The key's value before the overrides: its preset's, else its schema default's."""
        preset = self.preset(group, option) if option is not None and group in self.stored else {}
        tree: Any = preset
        for part in target.path:
            tree = tree.get(part, NO_DEFAULT) if isinstance(tree, dict) else NO_DEFAULT
        if tree is not NO_DEFAULT:
            return tree
        assert target.field is not None
        default, factory = target.field.default, target.field.default_factory
        if default is NO_DEFAULT and callable(factory):
            default = factory()
        return None if default is NO_DEFAULT or default == "???" else default

    def _check_value(self, key: str, group: str, option: str | None, schema: type[Any], value: Any) -> None:
        """Refuse a value the key's type does not take, as OmegaConf would when Hydra merges it; a mapping
        given to a group of keys (``train={max_steps: 3}``, ``logger.wandb={...}``) key by key.

        Raises:
            ConfigError: the value, the key and the type the key takes.
        """
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        target = self._target(key, group, option, schema)
        if target.below or (isinstance(value, str) and "${" in value):
            return  # a free mapping's entry, or an interpolation: checked once the config is composed
        if target.field is None or is_dataclass(_optional(target.hint)[0]):
            if not isinstance(value, dict):
                example = next((k for k in self.keys(group, schema) if k.startswith(f"{key}.")), f"{key}.KEY")
                raise ConfigError(
                    f"{key}={_shown(value)}: {key} holds keys, not a value; set them one by one, e.g. {example}=VALUE"
                )
            for name, item in value.items():
                self._check_value(f"{key}.{name}", group, option, schema, item)
            return
        _check_entries(key, target.hint, value)
        node = OmegaConf.structured(schema)
        try:
            OmegaConf.update(node, ".".join(target.path), value, merge=True)
        except OmegaConfBaseException as err:
            raise ConfigError(_value_message(key, target.hint, value, err)) from None

    def _check_free(self, override: Override, group: str, option: str | None, target: Target) -> None:
        """Entries of a free mapping (``model.extra.n_inner``): Hydra sets one the preset has, and adds
        one only with ``+``."""
        base, _ = _optional(target.hint)
        if (typing.get_origin(base) or base) is not dict:
            return  # a list's entries (optim.betas.0) or Any: OmegaConf checks them when composing
        preset = self.preset(group, option) if option is not None and group in self.stored else {}
        there = _has_path(preset, (*target.path, *target.below))
        key, line = override.key_or_group, override.input_line or ""
        if override.is_delete() and not there:
            raise ConfigError(f"{line}: {key} is not set by {group}={option}; there is nothing to remove")
        if not override.is_delete() and not override.is_add() and not override.is_force_add() and not there:
            raise ConfigError(
                f"{key} is not set by {group}={option}; add a new entry with a +: +{line.lstrip('~')}"
            )
        if override.is_add() and there:
            raise ConfigError(f"{line}: {group}={option} already sets {key}; drop the +: {line[1:]}")


def _declared_by(group: str, options: Sequence[str]) -> str:
    """``it is a key of data=text and data=hf (add data=text or data=hf)``."""
    its = " and ".join(f"{group}={option}" for option in options)
    return f"it is a key of {its} (add {' or '.join(f'{group}={option}' for option in options)})"


def _is_container(base: Any) -> bool:
    """Whether a key of this type has entries a dotted key may reach (a mapping, a list, anything)."""
    return base is Any or (typing.get_origin(base) or base) in (dict, list)


def _declared(schema: type[Any], prefix: str) -> Iterator[str]:
    hints = typing.get_type_hints(schema)
    for declared in fields(schema):
        base, _ = _optional(hints[declared.name])
        yield f"{prefix}{declared.name}"
        if is_dataclass(base):
            yield from _declared(base, f"{prefix}{declared.name}.")  # type: ignore[arg-type]


def _value_message(key: str, hint: Any, value: Any, err: Exception) -> str:
    """One line for a value OmegaConf refused: the key, the value and what the key takes."""
    base, optional = _optional(hint)
    words = kind(hint)
    if value is None and not optional:
        return f"{key}=null: {key} cannot be null; set it to {words}"
    if isinstance(base, type) and issubclass(base, Enum):
        found = closest(str(value), [str(member.value) for member in base])
        return f"{key}={_shown(value)} is not {words}" + (f"; {_did_you_mean(found)}" if found else "")
    origin = typing.get_origin(base) or base
    if origin in (list, dict) and not isinstance(value, (list, dict)):
        example = f"{key}=[a,b]" if origin is list else f"{key}={{name: value}}"
        return f"{key}={_shown(value)} is not {kind(base)}; write one in brackets, e.g. {example}"
    if origin in (list, dict) or base is Any:
        detail = str(err).splitlines()[0].rstrip(".")
        return f"{key}={_shown(value)}: {detail}; check the entries against the README's key table"
    return f"{key}={_shown(value)} is not {kind(base)}; set {key} to {words}"


def _check_entries(key: str, hint: Any, value: Any) -> None:
    """A list of mappings given to a list of a schema's entries (``optim.groups``): each key one of its.

    Raises:
        ConfigError: an entry's key the entry's schema does not declare, with the closest one.
    """
    base, _ = _optional(hint)
    if typing.get_origin(base) is not list or not isinstance(value, list):
        return
    item = typing.get_args(base)[0]
    if not is_dataclass(item):
        return
    names = [declared.name for declared in fields(item)]
    for entry in value:
        for name in entry if isinstance(entry, dict) else ():
            if name not in names:
                hint_text = _did_you_mean(closest(str(name), names))
                raise ConfigError(
                    f"{key}: {name} is not a key of an entry of {key} (its keys: {', '.join(names)})"
                    + (f"; {hint_text}" if hint_text else "")
                )
