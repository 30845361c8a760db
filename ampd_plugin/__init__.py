"""ampd-plugin: AMPD-style multi-round serving for existing vLLM/SGLang prefill/decode deployments.

The base package imports without vLLM, SGLang or Mooncake; engine integrations live in
`ampd_plugin.connector` and import their engine lazily.
"""

__version__ = "0.1.0"
