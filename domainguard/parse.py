"""YAML → Policy, keeping where every value came from so errors can say file:line:column.

Parsing is three steps: compose the YAML node tree (syntax, duplicate keys, alias
cycles), validate it against the pydantic model (types, unknown keys), then check
references between parts (unknown or duplicate domains, meaningless rules).
Nothing here depends on the model's depth; ``flow.resolve`` checks that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml
from pydantic import ValidationError

from .errors import Location, PolicyError
from .policy import (
    RESERVED_NAMES,
    Domain,
    ForbidCombine,
    ForbidFlow,
    ForbidIsolate,
    Policy,
    Reads,
    parse_layer_range,
)

Path_ = tuple  # a path into the document: keys and list indices


@dataclass
class SourceMap:
    """Where each value (and each mapping key) of a policy document starts."""

    file: str
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: Path_, *, key: bool = False) -> Location:
        """The deepest known position on ``path`` (1-based line and column)."""
        path = tuple(path)
        for n in range(len(path), -1, -1):
            sub = path[:n]
            table = self.keys if key and n == len(path) else self.values
            if sub in table:
                line, col = table[sub]
                return Location(self.file, line, col)
            if sub in self.keys:
                line, col = self.keys[sub]
                return Location(self.file, line, col)
        return Location(self.file, 1, 1)


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


# A policy has a few hundred values; aliases nested in aliases could expand a small file into billions.
MAX_VALUES = 100_000


def _to_python(node: yaml.Node, loader: yaml.SafeLoader, smap: SourceMap, path: Path_, active: set[int]) -> Any:
    if id(node) in active:
        raise PolicyError(
            "the document refers to itself through a YAML alias (a cycle)",
            code="DG108",
            location=Location(smap.file, *_mark(node)),
            hint="Replace the recursive alias with an explicit value.",
        )
    smap.values[path] = _mark(node)
    if len(smap.values) > MAX_VALUES:
        raise PolicyError(
            f"the document expands to more than {MAX_VALUES} values (YAML aliases repeated inside aliases?)",
            code="DG108",
            location=Location(smap.file, *_mark(node)),
            hint="Write the values out, or reuse fewer aliases.",
        )
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_object(node)
    active.add(id(node))
    try:
        if isinstance(node, yaml.SequenceNode):
            return [_to_python(item, loader, smap, path + (i,), active) for i, item in enumerate(node.value)]
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise PolicyError(
                    "mapping keys must be plain names",
                    code="DG102",
                    location=Location(smap.file, *_mark(key_node)),
                    hint="Write the key as a plain word.",
                )
            key = loader.construct_object(key_node)
            if key in out:
                first = smap.keys[path + (key,)]
                raise PolicyError(
                    f"duplicate key {key!r} (first defined at line {first[0]})",
                    code="DG103",
                    location=Location(smap.file, *_mark(key_node)),
                    hint="Merge the two entries into one.",
                )
            smap.keys[path + (key,)] = _mark(key_node)
            out[key] = _to_python(value_node, loader, smap, path + (key,), active)
        return out
    finally:
        active.discard(id(node))


def _compose(text: str, file: str) -> tuple[Any, SourceMap]:
    smap = SourceMap(file)
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise PolicyError(
                "the policy file is empty",
                code="DG114",
                location=Location(file, 1, 1),
                hint="Start from an example in policies/.",
            )
        return _to_python(root, loader, smap, (), set()), smap
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        problem = exc.problem or exc.context or "invalid YAML"
        if "tag:yaml.org,2002:merge" in problem:
            raise PolicyError("YAML merge keys (<<) are not supported in policies", code="DG101",
                              location=Location(file, line, col),
                              hint="Write the merged entries out (an anchor for a whole value, `*name`, works).") from None
        raise PolicyError(
            f"YAML syntax error: {problem}",
            code="DG101",
            location=Location(file, line, col),
            hint="Fix the YAML syntax at this point (indentation, quotes, colons).",
        ) from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"YAML error: {exc}", code="DG101", location=Location(file, 1, 1)) from None
    except RecursionError:
        raise PolicyError("the document nests too deeply to read", code="DG101", location=Location(file, 1, 1),
                          hint="Flatten the structure (a domain tree a few levels deep is plenty).") from None
    finally:
        loader.dispose()


def _walk_loc(loc: tuple, data: Any) -> tuple[Path_, list[tuple[Path_, str]]]:
    """A pydantic error location mapped onto the document: (its path there, and for each union
    it passes through, outermost first, the union's node and the member tag taken there)."""
    path: list = []
    tags: list[tuple[Path_, str]] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part not in node and isinstance(part, str):
            # pydantic names a key YAML did not read as a string (null, 3.14, a date) by its text
            part = next((k for k in node if not isinstance(k, str) and part in (str(k), repr(k))), part)
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part in ("from", "self"):
            path.append(part)
            node = None
        elif node is not None and part != "[key]" and not (
                isinstance(node, dict) and isinstance(part, str) and part.isidentifier() and part[:1].islower()):
            # a union tag such as 'list[...]' or 'Reads', not part of the document (a lower-case
            # name under a mapping is a key it lacks or should not have; '[key]' marks a bad key)
            tags.append((tuple(path), str(part)))
    return tuple(path), tags


def _fitting_members(errors: list[tuple[dict, Path_, list]]) -> list[tuple[dict, Path_, list]]:
    """Where a value matched no member of a union, keep the errors of the member it fits best.

    ``errors``: (pydantic error, its document path, its union tags) as ``_walk_loc`` gives them.
    Pydantic reports every member's complaints: ``{combine: [a]}`` under ``forbid`` gets
    "missing 'flow'" from the flow rule as well as "at least 2 items" from the combine rule.
    A member that wants another kind of value (a list where the value is a mapping) fits
    least; then one that complains of keys the value itself has or lacks (not of keys
    deeper inside); the one left fits best.
    """
    level = 0
    while True:
        groups: dict[tuple, dict[str, list]] = {}
        for item in errors:
            if len(item[2]) > level:
                node, tag = item[2][level]
                groups.setdefault(node, {}).setdefault(tag, []).append(item)
        if not groups:
            return errors
        drop: set[int] = set()
        for node, members in groups.items():
            if len(members) < 2:
                continue

            # every path here runs through ``node``: the member's tag was met there
            def misfit(items: list, node=node) -> tuple[int, int, int]:
                kind = sum(e["type"].endswith("_type") and path == node for e, path, _ in items)
                keys = sum(e["type"] in ("extra_forbidden", "missing") and len(path) <= len(node) + 1
                           for e, path, _ in items)
                return kind, keys, -max(len(path) for _, path, _ in items)

            best = min(members, key=lambda tag: misfit(members[tag]))
            drop.update(id(item) for tag, items in members.items() if tag != best for item in items)
        errors = [item for item in errors if id(item) not in drop]
        level += 1


def _schema_error(exc: ValidationError, data: Any, smap: SourceMap) -> PolicyError:
    walked = [(e, *_walk_loc(tuple(e["loc"]), data)) for e in exc.errors(include_url=False)]

    def where(err: dict, path: Path_) -> Location:
        on_key = err["type"] == "extra_forbidden" or tuple(err["loc"])[-1:] == ("[key]",)
        return smap.locate(path, key=on_key)

    errors = [(where(e, path), path, e) for e, path, _ in _fitting_members(walked)]
    located = sorted(errors, key=lambda t: (t[0].line or 0, t[0].column or 0))
    location, path, err = located[0]
    dotted = ".".join(str(p) for p in path) or "(top level)"
    if err["type"] == "extra_forbidden":
        message = f"unknown key {path[-1]!r} at {dotted}"
        hint = "Remove it or check its spelling against `domainguard schema`."
    elif err["type"] == "missing":
        missing = err["loc"][-1]
        if path and path[-1] == missing:  # 'from' / 'self' are walked into even when absent
            dotted = ".".join(str(p) for p in path[:-1]) or "(top level)"
        message = f"missing required key {missing!r} in {dotted}"
        hint = f"Add `{missing}:`."
    elif err["type"] == "literal_error" and path == ("domainguard",):
        message = f"unsupported schema version {err.get('input')!r}; this domainguard reads version 1"
        hint = "Write `domainguard: 1`."
    elif tuple(err["loc"])[-1:] == ("[key]",) and isinstance(err.get("input"), bool):
        parent = ".".join(str(p) for p in path[:-1]) or "(top level)"
        message = f"{parent}: a key YAML reads as the boolean {str(err['input']).lower()}, not as a name"
        hint = "YAML reads on/off/yes/no/true/false unquoted as booleans; quote the name (e.g. 'on': {})."
    elif tuple(err["loc"])[-1:] == ("[key]",):
        message = f"{dotted}: not a valid name ({err['msg'][0].lower()}{err['msg'][1:]})"
        hint = "Names are text that starts with a letter or '_'; quote a key YAML reads as a number, date or null."
    else:
        message = f"{dotted}: {err['msg']}"
        hint = "See `domainguard schema` for the expected shape."
    more = len({(e[0].line, e[2]['msg']) for e in located}) - 1
    if more > 0:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return PolicyError(message, code="DG102", location=location, hint=hint)


def _walk_domains(domains: dict[str, Domain], path: Path_) -> Iterator[tuple[str, Path_, Domain]]:
    for name, node in domains.items():
        yield name, path + (name,), node
        yield from _walk_domains(node.children, path + (name, "children"))


def _subtrees(policy: Policy) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}

    def visit(name: str, node: Domain) -> set[str]:
        names = {name}
        for child, sub in node.children.items():
            names |= visit(child, sub)
        out[name] = names
        return names

    for name, node in policy.domains.items():
        visit(name, node)
    return out


def _reads_sources(value: list[str] | Reads) -> list[str]:
    return list(value.sources) if isinstance(value, Reads) else list(value)


# Far beyond any policy a person writes; verification time and memory grow with the square of it.
MAX_DOMAINS = 4096


def _check_references(policy: Policy, smap: SourceMap) -> None:
    err = lambda msg, path, code, hint, key=False: PolicyError(  # noqa: E731
        msg, code=code, location=smap.locate(path, key=key), hint=hint
    )
    seen: dict[str, Path_] = {}
    for name, path, _ in _walk_domains(policy.domains, ("domains",)):
        if name in RESERVED_NAMES:
            raise err(f"{name!r} is a reserved name and cannot be a domain", path, "DG109", "Rename the domain.", True)
        if name in seen:
            first = smap.locate(seen[name], key=True)
            raise err(
                f"duplicate domain {name!r} (also declared at line {first.line})",
                path,
                "DG104",
                "Domain names are global: rename one of them.",
                True,
            )
        seen[name] = path
        if len(seen) > MAX_DOMAINS:
            raise err(f"more than {MAX_DOMAINS} domains", path, "DG116",
                      "Group fine-grained sources under fewer domains (a rule on a domain covers its descendants).", True)

    def known(name: str, path: Path_, key: bool = False) -> None:
        if name not in seen:
            close = [d for d in seen if d.lower() == name.lower() or d.startswith(name[:3])][:3]
            hint = f"Did you mean {', '.join(close)}?" if close else "Declare it under `domains:`."
            raise err(f"unknown domain {name!r}", path, "DG105", hint, key)

    def check_reads(reads: dict, base: Path_) -> None:
        for reader, value in reads.items():
            known(reader, base + (reader,), key=True)
            for i, src in enumerate(_reads_sources(value)):
                sub = ("sources", i) if isinstance(value, Reads) else (i,)
                known(src, base + (reader,) + sub)

    check_reads(policy.reads, ("reads",))
    subtree = _subtrees(policy)
    for i, rule in enumerate(policy.forbid):
        if isinstance(rule, ForbidFlow):
            pairs = [(rule.flow.from_, ("forbid", i, "flow", "from")), (rule.flow.to, ("forbid", i, "flow", "to"))]
        else:
            names = rule.combine if isinstance(rule, ForbidCombine) else rule.isolate
            kw = "combine" if isinstance(rule, ForbidCombine) else "isolate"
            pairs = [(n, ("forbid", i, kw, j)) for j, n in enumerate(names)]
        for name, path in pairs:
            known(name, path)
        (a, _), (b, pb) = pairs
        if subtree[a] & subtree[b]:
            raise err(
                f"rule relates {a!r} and {b!r}, which overlap in the domain tree, so it can never hold",
                ("forbid", i),
                "DG110",
                "Name two domains neither of which contains the other.",
            )
    for i, override in enumerate(policy.layers):
        try:
            parse_layer_range(override.layers, 1 << 30)
        except ValueError as exc:
            raise err(str(exc), ("layers", i, "layers"), "DG106", "Write a range such as '0-3', '5' or '8-'.") from None
        check_reads(override.reads, ("layers", i, "reads"))
    for name, value in policy.patterns.items():
        if name != "default":
            known(name, ("patterns", name), key=True)
        for j, pat in enumerate(value if isinstance(value, list) else [value]):
            sub = ("patterns", name) + ((j,) if isinstance(value, list) else ())
            for fld in ("layers", "heads"):
                text = getattr(pat, fld)
                if text is not None:
                    try:
                        parse_layer_range(text, 1 << 30)
                    except ValueError as exc:
                        raise err(str(exc), sub + (fld,), "DG106", "Write a range such as '0-3', '5' or '8-'.") from None
            if pat.dilation is not None and pat.window is None:
                raise err("`dilation` needs a `window`", sub + ("dilation",), "DG111", "Add `window:` or drop `dilation:`.")
    for pname, prof in policy.profiles.items():
        check_reads(prof.reads, ("profiles", pname, "reads"))
    if policy.generation is not None:
        known(policy.generation.domain, ("generation", "domain"))


def loads_policy(text: str, file: str = "<string>") -> Policy:
    """Parse policy YAML text; raise PolicyError naming file:line:column on any problem."""
    data, smap = _compose(text, file)
    if not isinstance(data, dict):
        raise PolicyError(
            "a policy is a mapping with keys such as `domainguard`, `name`, `domains`",
            code="DG114",
            location=Location(file, 1, 1),
            hint="Start from an example in policies/.",
        )
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise _schema_error(exc, data, smap) from None
    except RecursionError:
        raise PolicyError("the policy nests too deeply to check", code="DG101", location=Location(file, 1, 1),
                          hint="Flatten the structure (a domain tree a few levels deep is plenty).") from None
    _check_references(policy, smap)
    policy._source = smap
    return policy


def load_policy(path: str | Path) -> Policy:
    """Read and parse a policy file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError("no such policy file", code="DG113", location=Location(str(p)),
                          hint="Check the path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read the policy file: {exc}", code="DG113", location=Location(str(p)),
                          hint="Check the path and that the file is UTF-8 text.") from None
    return loads_policy(text, str(p))


def locate(policy: Policy, path: Path_, *, key: bool = False) -> Location | None:
    """Where ``path`` lies in the file ``policy`` was parsed from (None if built in Python)."""
    smap = policy._source
    return smap.locate(path, key=key) if isinstance(smap, SourceMap) else None
