"""Policy parsing: the DESIGN §2 example parses; every kind of bad input fails with file:line:column and a code."""

import json

import pytest

import domainguard as dg
from domainguard.errors import PolicyError
from domainguard.policy import json_schema

DESIGN_EXAMPLE = """\
domainguard: 1                 # schema version
name: clinical-assistant
domains:                       # a tree; a rule on a domain covers its descendants
  instructions: {}
  records: {description: Patient records}
  medicine:
    children: {pharmacology: {}, dosing: {}}
  toxicology: {}
  answer: {}
reads:                         # reader: [sources]. Tokens of a reader may attend to tokens of a source.
  records: [instructions]      # a domain reads itself unless it says `self: false`
  medicine: [instructions]
  answer: [instructions, records, medicine]
forbid:
  - flow: {from: toxicology, to: answer}     # no information path of any length
  - combine: [pharmacology, toxicology]      # no hidden state anywhere may depend on both
layers:                        # optional per-layer overrides (compositional constraints)
  - layers: "0-3"
    reads: {answer: [instructions]}
patterns:                      # sparsity INSIDE what `reads` allows; it can never widen it
  default: {causal: true}
  records: {window: 2048, global_tokens: 8}
profiles:                      # deployment profiles; a profile may only tighten (proved)
  public: {reads: {answer: [instructions, medicine]}}
generation: {domain: answer}   # domain of generated tokens
"""


def test_design_example_parses_and_proves():
    policy = dg.loads_policy(DESIGN_EXAMPLE, "design.yaml")
    compiled = dg.compile(policy, layers=12)
    assert compiled.domains == ("instructions", "records", "medicine", "pharmacology", "dosing", "toxicology", "answer")
    assert compiled.relations.shape == (12, 7, 7)
    ids = compiled.id_of
    # answer reads medicine's subtree from layer 4 on, only instructions before.
    assert not compiled.relations[0, ids("answer"), ids("pharmacology")]
    assert compiled.relations[4, ids("answer"), ids("pharmacology")]
    assert compiled.relations[4, ids("answer"), ids("answer")]  # reads itself by default
    assert not compiled.relations[4, ids("answer"), ids("toxicology")]
    assert dg.verify(compiled).status == dg.Status.PROVED


def _error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        dg.loads_policy(text, "p.yaml")
    return info.value


BASE = "domainguard: 1\nname: t\ndomains:\n  a: {}\n  b: {}\n"


@pytest.mark.parametrize(
    "text, code, line",
    [
        (BASE + "reads:\n  a: [b\n", "DG101", 8),  # YAML syntax: reported where the list should have closed
        (BASE + "reads:\n  a: [c]\n", "DG105", 7),  # unknown domain in sources
        (BASE + "reads:\n  c: [a]\n", "DG105", 7),  # unknown reader
        (BASE + "  a: {}\n", "DG103", 6),  # duplicate key
        ("domainguard: 1\nname: t\ndomains:\n  a:\n    children: {b: {}}\n  b: {}\n", "DG104", 6),  # duplicate domain
        (BASE + "colour: red\n", "DG102", 6),  # unknown key
        (BASE + "forbid:\n  - flow: {from: a, too: b}\n", "DG102", 7),  # unknown key inside a rule
        ("domainguard: 2\nname: t\ndomains: {a: {}}\n", "DG102", 1),  # schema version
        (BASE + "layers:\n  - layers: '3-1'\n    reads: {a: [b]}\n", "DG106", 7),  # backwards range
        (BASE + "forbid:\n  - flow: {from: a, to: a}\n", "DG110", 7),  # meaningless rule
        ("domainguard: 1\nname: t\ndomains:\n  default: {}\n", "DG109", 4),  # reserved name
        ("domainguard: 1\nname: t\ndomains: &d\n  a: {children: *d}\n", "DG108", 3),  # alias cycle, at the anchor
        ("", "DG114", 1),
        (BASE + "patterns:\n  a: {window: 0}\n", "DG102", 7),
        (BASE + "patterns:\n  a: {window: 4, global_tokens: 0}\n", "DG102", 7),  # 0 hubs keep nothing
        (BASE + "generation: {domain: z}\n", "DG105", 6),
        (BASE + "x: " + "[" * 2000 + "]" * 2000 + "\n", "DG101", 1),  # nesting past Python's recursion limit
        # aliases inside aliases: 10**8 values from a few hundred bytes; refused, at the anchor that repeats
        (BASE + "l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n"
         + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 8)), "DG108", 6),
    ],
)
def test_bad_policies_name_file_line_and_code(text, code, line):
    e = _error(text)
    assert e.code == code, str(e)
    assert e.location.file == "p.yaml"
    assert e.location.line == line, str(e)
    assert e.hint, "every error says how to fix it"
    assert str(e).startswith(f"p.yaml:{line}:")


@pytest.mark.parametrize(
    "tail, says, column, not_says, others",
    [
        # a rule of one kind with a bad value: not "missing 'flow'" from the rule kinds it is not
        ("forbid:\n  - combine: [a]\n", ("forbid.0.combine", "at least 2"), 14, ("flow", "isolate"), 0),
        ("forbid:\n  - isolate: [a, b, a]\n", ("forbid.0.isolate", "at most 2"), 14, ("flow", "combine"), 0),
        # a pattern mapping with a bad value: not "should be a valid list" from the list form
        ("patterns:\n  a: {causal: true, window: 0}\n", ("patterns.a.window", "greater than 0"), 29, ("list",), 0),
        # the list form with a bad item: the list's complaint, not "should be a valid dictionary"
        ("patterns:\n  a: [{window: 4}, {stride: -1}]\n", ("patterns.a.1.stride", "greater than 0"), 29,
         ("dictionary", "object"), 0),
        # reads as a list with a bad name: the name, not the mapping form's complaint
        ("reads:\n  a: [b, 'no such']\n", ("reads.a.1",), 10, ("dictionary", "object"), 0),
        # a reader name that is not a name: pointed at the name (the long form's own complaint waits its turn)
        ("reads:\n  Bad Name: {sources: [a], sefl: true}\n", ("reads.Bad Name", "should match pattern"), 3,
         ("list",), 1),
        # a flow rule with misspelt keys inside: the flow rule's complaint, not "missing 'combine'"
        ("forbid:\n  - flow: {source: a, target: b}\n", ("missing required key 'from' in forbid.0.flow",), 11,
         ("combine", "isolate"), 1),
        # keys YAML reads as a number or a date: pointed at the key
        ("reads:\n  3.14: [a]\n", ("reads.3.14", "not a valid name"), 3, ("list",), 0),
        ("reads:\n  2024-01-01: [a]\n", ("not a valid name",), 3, ("list",), 0),
        # reads as a mapping with a misspelt key: that key, not "should be a valid list"
        ("reads:\n  a: {sources: [b], sefl: false}\n", ("unknown key 'sefl'",), 21, ("list",), 0),
    ],
)
def test_schema_errors_come_from_the_form_the_value_takes(tail, says, column, not_says, others):
    e = _error(BASE + tail)
    assert e.code == "DG102", str(e)
    assert e.location.line == 7, str(e)
    assert e.location.column == column, str(e)
    for text in says:
        assert text in e.message, str(e)
    for text in not_says:
        assert text not in e.message.lower(), str(e)
    assert ("(and 1 more problem)" in e.message) == (others == 1) and ("more problems" not in e.message), str(e)


def test_layers_flag_is_bounded():
    policy = dg.loads_policy(BASE, "p.yaml")
    for bad in (0, 100_000_000):
        with pytest.raises(PolicyError) as info:
            dg.compile(policy, layers=bad)
        assert info.value.code == "DG107" and "4096" in str(info.value)
    assert dg.compile(policy, layers=4096).num_layers == 4096
    # a depth no model has, from the policy itself: refused where it is written, not a hang
    for text, line in ((BASE + "num_layers: 99999999999999999999\n", 6),
                       (BASE + "layers:\n  - layers: '99999999999999'\n    reads: {a: [b]}\n", 7)):
        with pytest.raises(PolicyError) as info:
            dg.compile(dg.loads_policy(text, "p.yaml"))
        assert info.value.code == "DG107" and info.value.location.line == line, str(info.value)


def test_depth_dependent_errors():
    policy = dg.loads_policy(BASE + "layers:\n  - layers: '0-40'\n    reads: {a: [b]}\n", "p.yaml")
    with pytest.raises(PolicyError) as info:
        dg.compile(policy, layers=12)
    assert info.value.code == "DG107" and info.value.location.line == 7
    with pytest.raises(PolicyError) as info:
        dg.compile(dg.loads_policy(BASE, "p.yaml"), layers=4, profile="nope")
    assert info.value.code == "DG112"
    overlapping = BASE + "layers:\n  - layers: '0-3'\n    reads: {a: [b]}\n  - layers: '2-5'\n    reads: {a: []}\n"
    with pytest.raises(PolicyError) as info:
        dg.compile(dg.loads_policy(overlapping, "p.yaml"), layers=8)
    assert info.value.code == "DG115"


def test_self_false_and_tree_semantics():
    text = BASE.replace("  b: {}\n", "  b:\n    children: {c: {}}\n") + "reads:\n  a: {sources: [b], self: false}\n"
    compiled = dg.compile(dg.loads_policy(text), layers=1)
    i = compiled.id_of
    rel = compiled.relations[0]
    assert not rel[i("a"), i("a")]
    assert rel[i("a"), i("b")] and rel[i("a"), i("c")]  # a source covers its descendants
    assert not rel[i("b"), i("a")] and rel[i("c"), i("c")]
    assert not rel.flags.writeable


def test_schema_is_json_schema():
    schema = json_schema()
    assert schema["title"] == "domainguard policy"
    assert {"domains", "reads", "forbid", "profiles"} <= set(schema["properties"])
    json.dumps(schema)
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema)
