"""The engine side of SGLang's PD wire as AMPD extends it: the bootstrap fields and the local-prefill sentinel.

SGLang PD pairs a prefill server's sender with a decode server's receiver through three fields of the
request body: `bootstrap_host`, `bootstrap_port` (the prefill server's `--disaggregation-bootstrap-port`)
and `bootstrap_room` (a random id in [0, 2**63-1]). AMPD adds a *local* prefill on the decode worker that
already holds the session's history: such a request carries the sentinel host `AMPD_LOCAL_BOOTSTRAP_HOST`,
and the `ampd` SGLang plugin on the decode worker (`local_prefill`) runs the prefill itself.

Pure constants and one predicate, no SGLang import: the router builds request bodies from them
(`ampd_plugin.router.sglang_wire`) and the decode worker's hooks recognise them.
"""

from __future__ import annotations

from typing import Any

SGLANG_DEFAULT_BOOTSTRAP_PORT = 8998
# Sentinel bootstrap host for "prefill locally on this decode worker". Not a resolvable name, so a
# decode worker without the ampd plugin fails the request fast (receiver cannot bootstrap) instead of
# silently computing anything.
AMPD_LOCAL_BOOTSTRAP_HOST = "ampd.local-prefill.invalid"
MAX_BOOTSTRAP_ROOM = 2**63 - 1


def is_local_prefill_request(bootstrap_host: Any) -> bool:
    """True when a decode worker should prefill this request itself (used by the SGLang plugin)."""
    if isinstance(bootstrap_host, list):
        return bool(bootstrap_host) and all(h == AMPD_LOCAL_BOOTSTRAP_HOST for h in bootstrap_host)
    return bootstrap_host == AMPD_LOCAL_BOOTSTRAP_HOST
