"""Configuration fuzzing through the real CLI (`python -m sqsbalancerd`), with hypothesis.

TOML files and SQSBALANCERD_ variables are built from the real key names (walked from the
pydantic models in sqsbalancerd/config.py, so a new key is fuzzed without editing this file)
with random values. Whatever comes in: never a traceback; exit 0 (valid) or 2 (invalid); an
invalid one gets exactly one stderr line that names the key (or the variable, or the file).

Three generators: chaos (random keys, unknown ones too, random value types, garbage files),
one-bad-key (a valid configuration with exactly one key made invalid, in the file or the
environment: the line must name that key), valid-by-construction (must exit 0 and print back
what was set). A few `run` cases: a bad configuration exits 2 before receiving anything, a
valid one starts and handles a message. Counts from `fuzz_examples` (tests/faults/totals.py):
short mode 60 `config` cases + 5 `run` cases; long mode (SQSB_FAULTS_LONG=1) 600 + 20.
"""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from support import queue_depth, read_events, wait_until
from totals import TOTALS

from sqsbalancerd.config import ENV_PREFIX, MIN_LOOP_S, QueueOverride, Settings

pytestmark = pytest.mark.faults

LONG = TOTALS.is_long
# `config` cases split from TOTALS.fuzz_examples; `run` cases (a process each) scale with it.
_CONFIG_CASES = TOTALS.fuzz_examples
EXAMPLES = {
    "chaos": _CONFIG_CASES // 2,
    "one_bad": _CONFIG_CASES // 3,
    "valid": _CONFIG_CASES - _CONFIG_CASES // 2 - _CONFIG_CASES // 3,
    "run": max(3, _CONFIG_CASES // 40),
    "run_valid": max(2, _CONFIG_CASES // 120),
}
TRIED: dict[str, int] = {}


def fuzz_settings(kind: str) -> Any:
    return settings(
        max_examples=EXAMPLES[kind],
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# -- the key tree, from the models ----------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]  # ("workers", "pool_size"); inside [[queue]]: ("match",) etc.
    kind: str  # bool int float str strs literal section
    low: float | None = None
    high: float | None = None
    is_open_low: bool = False  # gt rather than ge
    min_len: int = 0
    max_len: int | None = None
    choices: tuple[str, ...] = ()
    model: type[BaseModel] | None = None

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + "__".join(self.path).upper()

    @property
    def is_regex(self) -> bool:
        return self.path[-1] in ("queue_pattern", "exclude_pattern", "match")


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """Strip Optional and Annotated; return the bare type and the constraints found."""
    metadata: list[Any] = []
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        elif origin is typing.Annotated:
            annotation, *extra = typing.get_args(annotation)
            for item in extra:
                metadata.extend(getattr(item, "metadata", [item]))
        else:
            return annotation, metadata


def _leaf(path: tuple[str, ...], annotation: Any, metadata: list[Any]) -> Leaf:
    bare, inner = _unwrap(annotation)
    constraints: dict[str, Any] = {}
    for item in [*metadata, *inner]:
        if isinstance(item, at.Ge):
            constraints["low"] = item.ge
        elif isinstance(item, at.Gt):
            constraints.update(low=item.gt, is_open_low=True)
        elif isinstance(item, at.Le):
            constraints["high"] = item.le
        elif isinstance(item, at.MinLen):
            constraints["min_len"] = item.min_length
        elif isinstance(item, at.MaxLen):
            constraints["max_len"] = item.max_length
    if typing.get_origin(bare) is Literal:
        return Leaf(path, "literal", choices=typing.get_args(bare))
    if typing.get_origin(bare) is tuple:
        return Leaf(path, "strs")
    if isinstance(bare, type) and issubclass(bare, BaseModel):
        return Leaf(path, "section", model=bare)
    kind = {bool: "bool", int: "int", float: "float", str: "str"}[bare]
    return Leaf(path, kind, **constraints)


def leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[Leaf]:
    found: list[Leaf] = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        if name == "queue" and model is Settings:
            continue  # [[queue]]: generated as a list of tables below
        leaf = _leaf(path, field.annotation, list(field.metadata))
        if leaf.kind == "section" and not prefix:
            assert leaf.model is not None
            found.extend(leaves(leaf.model, path))
        else:
            found.append(leaf)
    return found


TOP = leaves(Settings)  # every key but [[queue]]
QUEUE_KEYS = leaves(QueueOverride)  # keys of one [[queue]] table (retry: a sub-table)
SECTIONS = sorted({leaf.path[0] for leaf in TOP if len(leaf.path) > 1})
TIMING_KEYS = {
    ("coordination", n) for n in ("heartbeat_interval", "heartbeat_timeout", "fence_margin")
}

# -- values --------------------------------------------------------------------------------

VALID_REGEXES = ["^orders-", "-dlq$", "^q-[0-9]+$", "work", r"^a\.b", "(x|y)", "^$", ".*"]
INVALID_REGEXES = ["(", "[a-", "*x", "(?P<n>", "a{2,1}"]
env_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24
)
toml_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)


def number_in(leaf: Leaf, *, as_int: bool) -> st.SearchStrategy[Any]:
    low = leaf.low if leaf.low is not None else -1e6
    high = leaf.high if leaf.high is not None else 1e6
    if as_int:
        first = math.floor(low) + 1 if leaf.is_open_low or low != math.floor(low) else int(low)
        return st.integers(first, math.floor(high))
    return st.floats(low, high, exclude_min=leaf.is_open_low, allow_nan=False, allow_infinity=False)


# Loop periods that are 0 (off) or at least MIN_LOOP_S: a validator the schema cannot show.
OFF_OR_LOOP_KEYS = {("observability", "backlog_interval")}


def valid_value(leaf: Leaf) -> st.SearchStrategy[Any]:
    if leaf.kind == "bool":
        return st.booleans()
    if leaf.kind == "int":
        return number_in(leaf, as_int=True)
    if leaf.kind == "float":
        numbers = number_in(leaf, as_int=False) | number_in(leaf, as_int=True)
        if leaf.path in OFF_OR_LOOP_KEYS:
            return numbers.filter(lambda value: not 0 < value < MIN_LOOP_S)
        return numbers
    if leaf.kind == "literal":
        return st.sampled_from(leaf.choices)
    if leaf.kind == "strs":
        return st.lists(st.sampled_from(["orders-a", "All", "trace_id", "q.fifo"]), max_size=3)
    if leaf.kind == "section":
        return st.just({})
    if leaf.is_regex:
        return st.sampled_from(VALID_REGEXES)
    return st.text(
        st.characters(blacklist_categories=("Cs", "Cc")),
        min_size=max(leaf.min_len, 1),
        max_size=min(leaf.max_len or 30, 30),
    )


def invalid_numbers(leaf: Leaf) -> list[st.SearchStrategy[Any]]:
    options = [st.sampled_from(["abc", "", "ten"]), st.just([1, 2])]
    if leaf.kind == "int":
        options.append(st.just(1.5))
    else:
        options.append(st.sampled_from([math.inf, -math.inf, math.nan]))
    if leaf.low is not None:
        options.append(st.just(leaf.low - 1 if not leaf.is_open_low else leaf.low))
    if leaf.high is not None:
        options.append(st.just(int(leaf.high) + 1))
    if leaf.path in OFF_OR_LOOP_KEYS:
        options.append(st.just(MIN_LOOP_S / 2))
    return options


def invalid_toml_value(leaf: Leaf) -> st.SearchStrategy[Any]:
    """Values that no validator may accept for this key, in a TOML file."""
    options: list[st.SearchStrategy[Any]] = [st.just({"nested": 1})]  # a table: never a leaf
    if leaf.kind == "bool":
        options += [st.sampled_from(["maybe", "2"]), st.just(7)]
    elif leaf.kind in ("int", "float"):
        options += invalid_numbers(leaf)
    elif leaf.kind == "literal":
        options.append(st.just("nonsense-value"))
    elif leaf.kind == "strs":
        options += [st.just("a-string"), st.just([1, 2])]
    elif leaf.kind == "str":
        options += [st.just(5), st.just([True])]
        if leaf.min_len:
            options.append(st.just("x" * (leaf.min_len - 1)))
        if leaf.is_regex:
            options.append(st.sampled_from(INVALID_REGEXES))
    elif leaf.kind == "section":
        options = [st.just(5), st.just("text")]
    return st.one_of(options)


def invalid_env_value(leaf: Leaf) -> st.SearchStrategy[str] | None:
    """Strings no validator may accept for this key in an environment variable (None: any
    string is a valid value for it)."""
    if leaf.kind == "bool":
        return st.sampled_from(["maybe", "2", "yesno"])
    if leaf.kind in ("int", "float"):
        values = ["abc", "1,5", "ten"] + (["1.5"] if leaf.kind == "int" else ["inf", "nan"])
        if leaf.low is not None:
            values.append(str(leaf.low - 1 if not leaf.is_open_low else leaf.low))
        if leaf.high is not None:
            values.append(str(int(leaf.high) + 1))
        return st.sampled_from(values)
    if leaf.kind == "literal":
        return st.just("nonsense-value")
    if leaf.kind == "strs":
        return st.sampled_from(["not json [", "a,b", '{"a": 1}'])
    if leaf.kind == "str" and leaf.is_regex:
        return st.sampled_from(INVALID_REGEXES)
    if leaf.kind == "str" and leaf.min_len > 1:
        return st.just("x" * (leaf.min_len - 1))
    return None


chaos_scalar = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.booleans(),
    toml_text,
    st.sampled_from(
        [
            "dynamodb",
            "standalone",
            "debug",
            "json",
            "^q-",
            "(",
            "",
            "none",
            "exponential",
            "0",
            "-1",
            "1e309",
            "true",
        ]
    ),
)
chaos_value = st.recursive(
    chaos_scalar,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def put(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = doc
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


# -- generators -----------------------------------------------------------------------------


@dataclass
class Case:
    doc: dict[str, Any] | None  # None: `raw` is the file
    env: dict[str, str]
    raw: bytes = b""
    bad_key: str | None = None  # one-bad-key: what the error line must name

    def names(self, file: Path) -> set[str]:
        """Everything the error line may legitimately name."""
        found = {str(file), file.name, "discovery", "config file"}
        found |= set(self.env)

        def walk(node: Any, prefix: tuple[str, ...]) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    found.add(".".join((*prefix, str(key))))
                    walk(value, (*prefix, str(key)))
            elif isinstance(node, list):
                for index, value in enumerate(node):
                    walk(value, (*prefix, str(index)))

        walk(self.doc or {}, ())
        for name in self.env:
            parts = name.upper().removeprefix(ENV_PREFIX).lower().split("__")
            found |= {".".join(parts[: i + 1]) for i in range(len(parts))}
        return {n for n in found if n}


@st.composite
def chaos_cases(draw: Any) -> Case:
    if draw(st.integers(0, 9)) == 0:  # garbage instead of TOML
        raw = draw(st.binary(max_size=60) | toml_text.map(str.encode))
        return Case(None, {}, raw=raw)
    doc: dict[str, Any] = {}
    for leaf in draw(st.lists(st.sampled_from(TOP), max_size=8)):
        value = draw(valid_value(leaf) | invalid_toml_value(leaf) | chaos_value)
        put(doc, leaf.path, value)
    if draw(st.booleans()):
        doc["queue"] = draw(st.lists(queue_table(chaos=True), max_size=2) | chaos_value)
    for _ in range(draw(st.integers(0, 2))):  # unknown keys, at the top or in a section
        where = draw(st.sampled_from([(), *[(s,) for s in SECTIONS]]))
        put(doc, (*where, draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True))), draw(chaos_scalar))
    env: dict[str, str] = {}
    for leaf in draw(st.lists(st.sampled_from(TOP), max_size=3)):
        env[leaf.env_name] = draw(env_text)
    if draw(st.integers(0, 4)) == 0:
        env[ENV_PREFIX + draw(st.from_regex(r"[A-Z_]{1,16}", fullmatch=True))] = "1"
    if draw(st.integers(0, 3)) == 0:  # a whole section (or [[queue]]) as JSON
        section = draw(st.sampled_from(["QUEUE", *[s.upper() for s in SECTIONS]]))
        env[ENV_PREFIX + section] = json.dumps(draw(chaos_value | st.lists(queue_table())))
    return Case(doc, env)


@st.composite
def queue_table(draw: Any, *, chaos: bool = False) -> dict[str, Any]:
    table: dict[str, Any] = {"match": draw(st.sampled_from(VALID_REGEXES))}
    for leaf in draw(st.lists(st.sampled_from(QUEUE_KEYS), max_size=3)):
        if chaos:
            put(table, leaf.path, draw(valid_value(leaf) | invalid_toml_value(leaf)))
        else:
            put(table, leaf.path, draw(valid_value(leaf)))
    return table


@st.composite
def valid_docs(draw: Any, *, for_run: bool = False) -> dict[str, Any]:
    """A valid configuration; `for_run`: one `run` can start with in a test (standalone, the
    test's handler and queues; keys that would slow or redirect it are left at their
    defaults)."""
    if for_run:
        doc = tomllib.loads(tomli_w.dumps(RUN_BASE))
        keys = [leaf for leaf in TOP if leaf.path in RUN_KEYS]
    else:
        doc = {
            "handler": "app.tasks:handle",
            "discovery": {"queue_pattern": draw(st.sampled_from(VALID_REGEXES))},
        }
        keys = [leaf for leaf in TOP if leaf.path not in TIMING_KEYS]
    for leaf in draw(st.lists(st.sampled_from(keys), max_size=10, unique=True)):
        put(doc, leaf.path, draw(valid_value(leaf)))
    if not for_run and draw(st.booleans()):  # the timing keys together, consistent
        interval = draw(st.floats(0.1, 100))
        margin = draw(st.floats(0.05, 100))
        put(doc, ("coordination", "heartbeat_interval"), interval)
        put(doc, ("coordination", "heartbeat_timeout"), interval + margin * 2 + 0.01)
        put(doc, ("coordination", "fence_margin"), margin)
    if not for_run and draw(st.booleans()):
        doc["queue"] = draw(st.lists(queue_table(), max_size=2))
    return doc


RUN_BASE: dict[str, Any] = {
    "handler": "handlers:record",
    "coordination": {"mode": "standalone"},
    "discovery": {"queue_pattern": "^fz-"},
    "sqs": {"wait_time_seconds": 1},
    "observability": {"http_port": 0, "log_format": "json"},
}
RUN_KEYS = {
    ("application_name",),
    ("instance_id",),
    ("sqs", "visibility_timeout"),
    ("sqs", "max_messages"),
    ("sqs", "message_attribute_names"),
    ("workers", "pool_size"),
    ("workers", "queue_size"),
    ("shutdown", "timeout"),
    ("retry", "backoff"),
    ("retry", "base"),
    ("retry", "max"),
    ("observability", "log_level"),
    ("observability", "log_format"),
    ("discovery", "include_dead_letter_queues"),
}


@st.composite
def one_bad_cases(draw: Any, *, for_run: bool = False) -> Case:
    doc = draw(valid_docs(for_run=for_run))
    if draw(st.integers(0, 3)) == 0 and doc.get("queue"):
        leaf = draw(st.sampled_from(QUEUE_KEYS))
        index = draw(st.integers(0, len(doc["queue"]) - 1))
        put(doc["queue"][index], leaf.path, draw(invalid_toml_value(leaf)))
        return Case(doc, {}, bad_key=f"queue.{index}.{leaf.dotted}")
    leaf = draw(st.sampled_from(TOP))
    env_value = invalid_env_value(leaf)
    if env_value is not None and draw(st.booleans()):
        return Case(doc, {leaf.env_name: draw(env_value)}, bad_key=leaf.env_name)
    put(doc, leaf.path, draw(invalid_toml_value(leaf)))
    return Case(doc, {}, bad_key=leaf.dotted)


# -- running the CLI ------------------------------------------------------------------------


def write_case(daemons: Any, case: Case, name: str = "fuzz.toml") -> Path:
    path = daemons.tmp_path / name
    if case.doc is None:
        path.write_bytes(case.raw)
    else:
        path.write_text(tomli_w.dumps(case.doc), encoding="utf-8")
    return path


def check_outcome(result: Any, case: Case, file: Path) -> None:
    output = result.stdout + result.stderr
    context = f"\nfile:\n{file.read_bytes()[:2000]!r}\nenv: {case.env}\nout:\n{output[-3000:]}"
    assert "Traceback" not in output, context
    assert result.returncode in (0, 2), context
    if result.returncode == 0:
        tomllib.loads(result.stdout)
        return
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sqsbalancerd: error: "), context
    if case.bad_key is not None:
        assert case.bad_key in lines[0], f"error does not name {case.bad_key}: {context}"
    else:
        assert any(name in lines[0] for name in case.names(file)), context


def run_config(daemons: Any, case: Case) -> tuple[Any, Path]:
    file = write_case(daemons, case)
    return daemons.run_cli("config", "--config", str(file), env=case.env, timeout_s=30), file


@pytest.mark.timeout(120)  # x8 in the long mode
def test_chaotic_configurations_never_crash(daemons):
    @fuzz_settings("chaos")
    @given(case=chaos_cases())
    def check(case: Case) -> None:
        TRIED["chaos"] = TRIED.get("chaos", 0) + 1
        result, file = run_config(daemons, case)
        check_outcome(result, case, file)

    check()
    print(f"\nconfig fuzz, chaos: {TRIED['chaos']} cases tried")


@pytest.mark.timeout(120)  # x8 in the long mode
def test_one_bad_key_exits_2_naming_it(daemons):
    @fuzz_settings("one_bad")
    @given(case=one_bad_cases())
    def check(case: Case) -> None:
        TRIED["one_bad"] = TRIED.get("one_bad", 0) + 1
        result, file = run_config(daemons, case)
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        check_outcome(result, case, file)

    check()
    print(f"\nconfig fuzz, one bad key: {TRIED['one_bad']} cases tried")


@pytest.mark.timeout(120)  # x8 in the long mode
def test_valid_configurations_exit_0_and_print_what_was_set(daemons):
    @fuzz_settings("valid")
    @given(doc=valid_docs())
    def check(doc: dict[str, Any]) -> None:
        TRIED["valid"] = TRIED.get("valid", 0) + 1
        case = Case(doc, {})
        result, file = run_config(daemons, case)
        check_outcome(result, case, file)
        assert result.returncode == 0, (doc, result.stderr)
        printed = tomllib.loads(result.stdout)
        for section, values in doc.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    assert same(printed[section][key], value), (section, key, value)
            elif section != "queue":
                assert same(printed[section], values), (section, values)
        assert len(printed.get("queue", [])) == len(doc.get("queue", []))

    check()
    print(f"\nconfig fuzz, valid: {TRIED['valid']} cases tried")


def same(printed: Any, given_value: Any) -> bool:
    if isinstance(given_value, str) and isinstance(printed, str):
        return printed == given_value or printed == given_value.lower()  # log_level
    if isinstance(given_value, list):
        return list(printed) == given_value
    return bool(printed == given_value)


# -- `run` with such configurations ---------------------------------------------------------


@pytest.mark.timeout(120)
def test_run_exits_2_before_receiving_on_a_bad_configuration(sqs, daemons):
    url = sqs.create_queue(QueueName="fz-a")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="{}")

    @fuzz_settings("run")
    @given(case=one_bad_cases(for_run=True))
    def check(case: Case) -> None:
        TRIED["run"] = TRIED.get("run", 0) + 1
        file = write_case(daemons, case, "run.toml")
        result = daemons.run_cli("run", "--config", str(file), env=case.env, timeout_s=60)
        assert result.returncode == 2, (case, result.stdout, result.stderr[-2000:])
        check_outcome(result, case, file)
        assert queue_depth(sqs, url) == (1, 0)  # nothing was received

    check()
    print(f"\nrun with one bad key: {TRIED['run']} cases tried, all exit 2 before receiving")


@pytest.mark.timeout(120)
def test_run_starts_with_random_valid_configurations(sqs, daemons):
    url = sqs.create_queue(QueueName="fz-a")["QueueUrl"]

    @fuzz_settings("run_valid")
    @given(doc=valid_docs(for_run=True))
    def check(doc: dict[str, Any]) -> None:
        TRIED["run_valid"] = TRIED.get("run_valid", 0) + 1
        message_id = sqs.send_message(QueueUrl=url, MessageBody="{}")["MessageId"]
        daemon = daemons.start(config=tomli_w.dumps(doc))
        try:
            wait_until(
                lambda: any(
                    e["id"] == message_id and e["event"] == "end"
                    for e in read_events(daemons.events_path)
                ),
                timeout_s=60,
                what="the message handled",
            )
        finally:
            daemon.terminate()
            code = daemon.wait(timeout_s=60)
        assert code == 0, daemon.log()[-3000:]
        assert "Traceback" not in daemon.log()

    check()
    print(
        f"\nrun with a valid random configuration: {TRIED['run_valid']} started and "
        "handled a message"
    )
