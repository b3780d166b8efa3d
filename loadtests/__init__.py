"""Load-test and benchmark toolkit for OpenAI-compatible LLM endpoints.

Replays synthetic, Azure and Mooncake workloads with exact token-level prompts, measures
TTFT/TPOT/ITL/end-to-end latency over streaming responses, and reports SLO attainment and
goodput (vLLM-style and DistServe-style). Entry point: ``python -m loadtests``.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
