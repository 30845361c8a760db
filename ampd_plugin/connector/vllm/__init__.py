"""vLLM KV connector `ampd` (facade `connector.AMPDConnector`; halves `scheduler`, `worker`)."""
