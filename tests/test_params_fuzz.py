"""Fuzzing the params loader: the real params.yaml, the package defaults (conf/config.yaml) and ``--set`` overrides
with random bytes changed, values swapped for other YAML types, keys deleted, added or duplicated, huge and
non-finite numbers, deep nesting, non-UTF-8 bytes, object tags and alias bombs. Every case must end in a valid
``Params`` or the one-line ``ParamsError`` (``UserError`` for an override the command line cannot parse), never
another exception, which the command line would show as a traceback."""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddim_denoise.cli import UserError, parse_overrides
from ddim_denoise.pipeline import params as params_module
from ddim_denoise.pipeline.params import CONF_DIR, Params, ParamsError, flatten, load_params, validate_params

CASES = 1000  # fixed and derandomized: the same cases on every run, seconds
MAX_MUTATIONS = 3
# Each case takes milliseconds (the first one that names an Inductor setting imports torch's config: a second or
# two); the margin is for two busy cores.
CASE_DEADLINE = timedelta(seconds=10)
PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"
SEEDS = {"params.yaml": PARAMS_YAML.read_bytes(), "config.yaml": (CONF_DIR / "config.yaml").read_bytes()}
KEYS = sorted(flatten(validate_params(yaml.safe_load(SEEDS["params.yaml"]))))
# what an object tag that ran os.system would create; one name per test process, removed before and after each test
MARKER = Path(tempfile.gettempdir()) / f"ddim-denoise-params-fuzz-constructed-an-object-{os.getpid()}"


@pytest.fixture(autouse=True)
def no_marker():
    MARKER.unlink(missing_ok=True)
    yield
    MARKER.unlink(missing_ok=True)


# Values that break loaders: every YAML type, huge and non-finite numbers, deep nesting, object tags, alias bombs.
BOMB = "&a [x, x, x, x, x, x, x, x]" + "".join(f", {'&' + c} [{', '.join(['*' + p] * 8)}]"
                                              for p, c in zip("abcdefg", "bcdefgh"))
NASTY_VALUES = [
    "null", "~", "true", "off", "0", "-1", "1e400", "-.inf", ".nan", "9" * 5000, "0x7fffffffffffffffff", "1.5",
    '""', "'x'", "[]", "{}", "[1, 2]", "{a: 1}", "!!binary AAAA", "!!set {a, b}", "2024-01-01",
    "[" * 200 + "]" * 200, "{a: " * 100 + "1" + "}" * 100,
    f"!!python/object/apply:os.system ['touch {MARKER}']", "!!python/name:os.system", "!!python/object:object {}",
    f"[{BOMB}]", "&x 1", "*undefined", '"\\u0000"', "'a\nb'", "|\n  text",
]


def _with_value(text: str, line_no: int, value: str) -> str:
    """``text`` with the value of the key on ``line_no`` replaced (or a list item's, or the line itself)."""
    lines = text.splitlines() or [""]
    line = lines[line_no]
    key, colon, _ = line.partition(":")
    lines[line_no] = f"{key}: {value}" if colon else f"{line[:len(line) - len(line.lstrip())]}- {value}"
    return "\n".join(lines) + "\n"


@st.composite
def mutated_yaml(draw) -> tuple[str, bytes]:
    """(which file, its mutated bytes): byte-level changes, or YAML-level ones on the lines."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    text = SEEDS[name].decode()  # non-UTF-8 bytes a mutation makes stay as surrogates until written back
    for _ in range(draw(st.integers(1, MAX_MUTATIONS))):
        lines = text.splitlines() or [""]
        at_line = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "value", "value", "value", "drop",
                                     "duplicate", "add_key", "indent"]))
        if kind in ("flip", "insert", "delete", "truncate"):
            data = bytearray(text.encode("utf-8", errors="surrogateescape"))
            at = draw(st.integers(0, max(len(data) - 1, 0)))
            if kind == "flip" and data:
                data[at] ^= 1 << draw(st.integers(0, 7))  # high bits make non-UTF-8 bytes
            elif kind == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            elif kind == "delete":
                del data[at:at + draw(st.integers(1, 16))]
            else:
                del data[at:]
            text = data.decode("utf-8", errors="surrogateescape")
        elif kind == "value":
            value = draw(st.sampled_from(NASTY_VALUES) | st.from_regex(r"[ -~]{0,12}", fullmatch=True))
            text = _with_value(text, at_line, value)
        elif kind == "drop":
            text = "\n".join(lines[:at_line] + lines[at_line + 1:]) + "\n"
        elif kind == "duplicate":
            text = "\n".join(lines[:at_line + 1] + lines[at_line:]) + "\n"
        elif kind == "add_key":
            indent = lines[at_line][:len(lines[at_line]) - len(lines[at_line].lstrip())]
            key = draw(st.sampled_from(["new_key", "lr", "train", "'a\nb'", "? [1, 2]", "1", "null", "<<"]))
            lines.insert(at_line, f"{indent}{key}: {draw(st.sampled_from(NASTY_VALUES))}")
            text = "\n".join(lines) + "\n"
        else:  # indent: a section moved under another key
            lines[at_line] = "  " * draw(st.integers(1, 3)) + lines[at_line]
            text = "\n".join(lines) + "\n"
    return name, text.encode("utf-8", errors="surrogateescape")


@st.composite
def overrides(draw) -> list[str]:
    """``--set KEY=VALUE`` items: real keys, misspelt or nested ones, any value YAML can hold or fail to."""
    items = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(KEYS) | st.sampled_from(["train", "train.lr.x", "nope", "train..lr", "", "a\nb"]))
        value = draw(st.sampled_from(NASTY_VALUES) | st.text(max_size=12))
        items.append(f"{key}={value}")
    return items


@pytest.fixture
def isolated_defaults(monkeypatch, tmp_path):
    """The package's defaults read from ``tmp_path/conf`` (a mutated copy), never cached across cases."""
    (tmp_path / "conf").mkdir()
    monkeypatch.setattr(params_module, "CONF_DIR", tmp_path / "conf")
    params_module._read_defaults.cache_clear()
    yield tmp_path / "conf" / "config.yaml"
    params_module._read_defaults.cache_clear()


def _loads_or_refuses_in_one_line(load, outcomes: Counter, errors=(ParamsError,)) -> None:
    try:
        params = load()
    except errors as e:
        assert "\n" not in str(e), f"a multi-line error: {e!r}"
        outcomes["refused"] += 1
    else:
        assert isinstance(params, Params)
        outcomes["loaded"] += 1


def test_mutated_params_files_load_or_fail_with_the_one_line_error(tmp_path, isolated_defaults):
    outcomes: Counter = Counter()
    params_path = tmp_path / "params.yaml"
    isolated_defaults.write_bytes(SEEDS["config.yaml"])
    started = time.monotonic()

    @settings(max_examples=CASES, derandomize=True, database=None, deadline=CASE_DEADLINE,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(mutated_yaml())
    def load_or_refuse(case):
        name, data = case
        target = params_path if name == "params.yaml" else isolated_defaults
        target.write_bytes(data)
        try:
            params_module._read_defaults.cache_clear()
            _loads_or_refuses_in_one_line(lambda: load_params(params_path), outcomes)
        finally:
            target.write_bytes(SEEDS[name])

    load_or_refuse()
    tried = sum(outcomes.values())
    print(f"fuzzed the params loader with {tried} mutated files in {time.monotonic() - started:.1f} s: "
          f"{outcomes['loaded']} loaded, {outcomes['refused']} refused in one line")
    assert tried >= CASES // 2 and outcomes["loaded"] and outcomes["refused"]
    assert not MARKER.exists(), "a YAML tag constructed an object"


def test_mutated_overrides_load_or_fail_with_the_one_line_error():
    outcomes: Counter = Counter()

    @settings(max_examples=CASES // 4, derandomize=True, database=None, deadline=CASE_DEADLINE,
              suppress_health_check=[HealthCheck.too_slow])
    @given(overrides())
    def load_or_refuse(items):
        _loads_or_refuses_in_one_line(lambda: load_params(PARAMS_YAML, parse_overrides(items)), outcomes,
                                      (ParamsError, UserError))

    load_or_refuse()
    print(f"fuzzed --set with {sum(outcomes.values())} override lists: {outcomes['loaded']} loaded, "
          f"{outcomes['refused']} refused in one line")
    assert outcomes["loaded"] and outcomes["refused"]
    assert not MARKER.exists(), "a YAML tag constructed an object"


def test_an_alias_bomb_and_deep_nesting_are_refused_quickly(tmp_path):
    """A billion laughs: PyYAML builds aliases as references, and nothing walks them expanded."""
    text = PARAMS_YAML.read_text()
    for value in (f"[{BOMB}]", "[" * 5000 + "]" * 5000):
        path = tmp_path / "params.yaml"
        path.write_text(_with_value(text, text.splitlines().index("seed: 0"), value))
        started = time.monotonic()
        with pytest.raises(ParamsError) as refused:
            load_params(path)
        assert time.monotonic() - started < 15 and "\n" not in str(refused.value)
