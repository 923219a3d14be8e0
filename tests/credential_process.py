"""A `credential_process` for tests: prints the key in the JSON file named by argv[1].

botocore renews process credentials when fewer than 15 minutes remain: the expiry printed,
15 min + argv[2] seconds from now, makes each client fetch again argv[2] seconds later.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta

key = json.loads(open(sys.argv[1]).read())  # noqa: SIM115 - one read, the process ends
expiry = datetime.now(UTC) + timedelta(minutes=15, seconds=float(sys.argv[2]))
print(
    json.dumps(
        {
            "Version": 1,
            "AccessKeyId": key["AccessKeyId"],
            "SecretAccessKey": key["SecretAccessKey"],
            "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
)
