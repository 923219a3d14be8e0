"""The least-privilege IAM policy for one configuration (`sqsbalancerd iam-policy`).

Queue resources come from `discovery.queue_pattern` (searched with `re.search`, so an
unanchored pattern matches anywhere in a name) and `discovery.queues`:
- `^orders-` → `…:orders-*`; `^(a|b)-` → `…:a-*` and `…:b-*`; `^jobs$` → `…:jobs`;
- `orders` (unanchored) → `…:*orders*`;
- a pattern with no literal text to anchor on (`^.*-jobs`, `(?i)^orders`) → `…:*`, with a
  warning: the role may then read every queue of the account.
Batch calls need no actions of their own: AWS authorises `DeleteMessageBatch` by
`sqs:DeleteMessage` and `ChangeMessageVisibilityBatch` by `sqs:ChangeMessageVisibility`.
`ListQueues` is authorised on `*` only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from re import _constants as sre_constants  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

from sqsbalancerd.config import Settings

REGION_PLACEHOLDER = "${AWS_REGION}"
ACCOUNT_PLACEHOLDER = "${AWS_ACCOUNT_ID}"
# More alternatives than this ("^(a|b|c|…)-") and one wildcard reads better.
MAX_PREFIXES = 20

QUEUE_ACTIONS = (
    "sqs:GetQueueAttributes",
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibility",
)
TABLE_ACTIONS = (
    "dynamodb:DescribeTable",
    "dynamodb:GetItem",
    "dynamodb:BatchGetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:Query",
)
TABLE_CREATE_ACTIONS = ("dynamodb:CreateTable", "dynamodb:UpdateTimeToLive")

_Items = list[tuple[Any, Any]]


@dataclass(frozen=True, slots=True)
class Policy:
    document: dict[str, Any]
    warnings: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(self.document, indent=2) + "\n"


@dataclass(frozen=True, slots=True)
class _Names:
    """What a pattern matches, as IAM resource name globs (`*` anywhere)."""

    globs: tuple[str, ...]
    warning: str | None = None


def _literal_run(items: _Items) -> tuple[list[str], bool]:
    """Leading literal text of a parsed pattern, as alternatives; True if it is all literal."""
    prefixes = [""]
    for op, arg in items:
        if op is sre_constants.LITERAL:
            prefixes = [p + chr(arg) for p in prefixes]
        elif op is sre_constants.IN and all(o is sre_constants.LITERAL for o, _ in arg):
            prefixes = [p + chr(c) for p in prefixes for _, c in arg]
        elif op is sre_constants.SUBPATTERN and not arg[1] and not arg[2]:
            inner, is_complete = _literal_run(list(arg[3]))
            prefixes = [p + s for p in prefixes for s in inner]
            if not is_complete:
                return prefixes, False
        elif op is sre_constants.BRANCH:
            runs = [_literal_run(list(branch)) for branch in arg[1]]
            prefixes = [p + s for p in prefixes for run, _ in runs for s in run]
            if not all(is_complete for _, is_complete in runs):
                return prefixes, False
        else:
            return prefixes, False
        if len(prefixes) > MAX_PREFIXES:
            return [""], False
    return prefixes, True


def pattern_globs(pattern: str) -> _Names:
    parsed = sre_parse.parse(pattern)
    items: _Items = list(parsed.data)
    where = f"discovery.queue_pattern {pattern!r}"
    if parsed.state.flags & re.IGNORECASE:
        return _Names(("*",), f"{where} ignores case: the policy allows every queue (*)")
    is_anchored = bool(items) and items[0] == (sre_constants.AT, sre_constants.AT_BEGINNING)
    if is_anchored:
        items = items[1:]
    is_exact = bool(items) and items[-1] == (sre_constants.AT, sre_constants.AT_END)
    runs, is_complete = _literal_run(items[:-1] if is_exact else items)
    if not all(runs):
        return _Names(
            ("*",),
            f"{where} has no literal text to scope queues by: the policy allows every queue "
            "(*); start it with a literal prefix (^orders-) to narrow it",
        )
    if is_anchored and is_exact and is_complete:
        return _Names(tuple(runs))
    if is_anchored:
        return _Names(tuple(f"{run}*" for run in runs))
    return _Names(
        tuple(f"*{run}*" for run in runs),
        f"{where} is not anchored (re.search matches anywhere in a name): the policy allows "
        f"queues containing it; anchor it (^{pattern}) to narrow it to a prefix",
    )


def _named_queue_arn(entry: str, *, region: str, account_id: str) -> str:
    """A `discovery.queues` entry: a name, or a URL (…/ACCOUNT/NAME) naming its account."""
    if entry.startswith(("https://", "http://")):
        account_id, name = entry.rstrip("/").split("/")[-2:]
        return f"arn:aws:sqs:{region}:{account_id}:{name}"
    return f"arn:aws:sqs:{region}:{account_id}:{entry}"


def _queue_statement(
    settings: Settings, *, region: str, account_id: str
) -> tuple[dict[str, Any], list[str]]:
    discovery = settings.discovery
    resources: list[str] = []
    warnings: list[str] = []
    if discovery.queue_pattern:
        names = pattern_globs(discovery.queue_pattern)
        resources += [f"arn:aws:sqs:{region}:{account_id}:{glob}" for glob in names.globs]
        if names.warning:
            warnings.append(names.warning)
    resources += [
        _named_queue_arn(entry, region=region, account_id=account_id) for entry in discovery.queues
    ]
    # Named queues are looked up by name (GetQueueUrl); pattern matches come from ListQueues.
    actions = list(QUEUE_ACTIONS)
    if any(not q.startswith(("https://", "http://")) for q in discovery.queues):
        actions.insert(0, "sqs:GetQueueUrl")
    statement = {
        "Sid": "ConsumeQueues",
        "Effect": "Allow",
        "Action": actions,
        "Resource": list(dict.fromkeys(resources)),
    }
    return statement, warnings


def build_policy(settings: Settings, *, region: str, account_id: str) -> Policy:
    """The policy `sqsbalancerd run` needs with `settings`, and why it may be broad."""
    consume, warnings = _queue_statement(settings, region=region, account_id=account_id)
    statements: list[dict[str, Any]] = [
        {"Sid": "DiscoverQueues", "Effect": "Allow", "Action": ["sqs:ListQueues"], "Resource": "*"},
        consume,
    ]
    coordination = settings.coordination
    if coordination.mode == "dynamodb":
        actions = list(TABLE_ACTIONS)
        if coordination.create_table:
            actions[1:1] = TABLE_CREATE_ACTIONS
        statements.append(
            {
                "Sid": "Coordinate",
                "Effect": "Allow",
                "Action": actions,
                "Resource": f"arn:aws:dynamodb:{region}:{account_id}:table/"
                f"{coordination.table_name}",
            }
        )
    document = {"Version": "2012-10-17", "Statement": statements}
    return Policy(document, tuple(warnings))
