"""`vllm.general_plugins` entry point: makes `"kv_connector": "ampd"` resolvable in every vLLM process.

vLLM runs general plugins in the API server, the EngineCore and every worker, possibly more than once per
process, so registration is idempotent. Importing vLLM only happens here, when vLLM itself calls us.
"""

from __future__ import annotations

CONNECTOR_NAME = "ampd"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME in getattr(KVConnectorFactory, "_registry", {}):
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, "ampd_plugin.connector.vllm.connector", "AMPDConnector")
