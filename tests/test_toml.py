"""The built-in TOML parser (used below 3.11): exact values, errors with positions, and the same
result as tomllib on every example config where tomllib exists."""

import glob
import math
import os

import pytest

import ambassador
from ambassador import TOMLError, toml_loads
from conftest import ROOT

try:
    import tomllib
except ImportError:
    tomllib = None

EVERYTHING = r'''
# comment
title = "basic \"quoted\" \t \u00e9 \U0001F600 \\ end"   # trailing comment
literal = 'C:\path\no-escapes'
multi = """
first line \
    joined
second"""
multi_literal = QQQ
raw \n stays
QQQ
ints = [1, +2, -3, 1_000, 0xff, 0o17, 0b101, 0]
floats = [1.5, -0.25, 1e3, 2E-2, 6.02_2e2, inf, -inf]
bools = [true, false]
nested = [[1, 2], ["a", 'b'], [], [{x = 1}]]
multi_line_array = [
  "a",   # one
  "b",
]
"quoted key" = 1
'literal key' = 2
dotted.key.here = 3
site."google.com" = true
inline = { address = "10.0.0.1:80", weight = 3, deep.er = "x" }

[table]
key = "value"

[table.sub]
n = 1

[a.b.c]
d = 1

[[fruits]]
name = "apple"
[fruits.physical]
color = "red"

[[fruits]]
name = "banana"

[ spaced . header ]
ok = true
'''.replace("QQQ", "'" * 3)

EXPECTED = {
    "title": 'basic "quoted" \t \u00e9 \U0001F600 \\ end',
    "literal": "C:\\path\\no-escapes",
    "multi": "first line joined\nsecond",
    "multi_literal": "raw \\n stays\n",
    "ints": [1, 2, -3, 1000, 255, 15, 5, 0],
    "floats": [1.5, -0.25, 1000.0, 0.02, 602.2, math.inf, -math.inf],
    "bools": [True, False],
    "nested": [[1, 2], ["a", "b"], [], [{"x": 1}]],
    "multi_line_array": ["a", "b"],
    "quoted key": 1,
    "literal key": 2,
    "dotted": {"key": {"here": 3}},
    "site": {"google.com": True},
    "inline": {"address": "10.0.0.1:80", "weight": 3, "deep": {"er": "x"}},
    "table": {"key": "value", "sub": {"n": 1}},
    "a": {"b": {"c": {"d": 1}}},
    "fruits": [{"name": "apple", "physical": {"color": "red"}}, {"name": "banana"}],
    "spaced": {"header": {"ok": True}},
}


def test_builtin_parser_reads_every_construct_configs_use():
    assert toml_loads(EVERYTHING) == EXPECTED
    assert math.isnan(toml_loads("x = nan")["x"])


def example_configs():
    paths = [os.path.join(ROOT, "ambassador.toml")]
    paths += glob.glob(os.path.join(ROOT, "tests", "configs", "*.toml"))
    return paths


@pytest.mark.skipif(tomllib is None, reason="tomllib is 3.11+")
@pytest.mark.parametrize("path", example_configs())
def test_builtin_parser_agrees_with_tomllib_on_example_configs(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert toml_loads(text) == tomllib.loads(text)


@pytest.mark.skipif(tomllib is None, reason="tomllib is 3.11+")
def test_builtin_parser_agrees_with_tomllib_on_everything():
    assert toml_loads(EVERYTHING) == tomllib.loads(EVERYTHING)


def test_readme_config_example_parses_the_same(tmp_path):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    blocks = [b.split("```", 1)[0] for b in readme.split("```toml\n")[1:]]
    assert blocks, "the README shows its configs in ```toml blocks"
    for block in blocks:
        parsed = toml_loads(block)
        if tomllib is not None:
            assert parsed == tomllib.loads(block)


INVALID = [
    ("a = 1\na = 2\n", 2),                      # key defined twice
    ("[t]\nx = 1\n[t]\ny = 2\n", 3),            # table declared twice
    ("a = \"unterminated\n", 1),
    ("a = 1 b = 2\n", 1),
    ("x = [1, 2\ny = 3\n", 2),
    ("a = 01\n", 1),
    ("a = 1__0\n", 1),
    ("a = \"\\q\"\n", 1),
    ("[a\n", 1),
    ("a = {x = 1, x = 2}\n", 1),
    ("a = \n", 1),
    ("= 1\n", 1),
    ("a = [1]\n[[a]]\n", 2),                    # static array extended
    ("a = {x = 1}\n[a]\ny = 1\n", 2),          # inline table extended
    ("d = 1979-05-27\n", 1),                    # dates are not for configs
]


@pytest.mark.parametrize("text,line", INVALID)
def test_invalid_documents_are_refused_with_their_line(text, line):
    with pytest.raises(TOMLError) as e:
        toml_loads(text)
    assert e.value.line == line, str(e.value)
    assert e.value.column >= 1
    if tomllib is not None and "1979" not in text:
        with pytest.raises(tomllib.TOMLDecodeError):
            tomllib.loads(text)


def test_parse_toml_reports_positions_the_same_way_with_either_parser():
    with pytest.raises(TOMLError) as e:
        ambassador.parse_toml("ok = 1\n[broken\n")
    assert e.value.line == 2
