"""KV connectors of the plugin: `params` (the router↔engine wire), `transfer` (Mooncake wrapper shared by the
engine connectors) and `vllm/` (the `ampd` connector for vLLM). See docs/connector.md."""
