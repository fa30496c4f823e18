"""vinterp benchmarks: vinterp vs plain vLLM, nnsight and plain Hugging Face, as ratios in one run.

Run ``python -m benchmarks run [--quick] [--only WORKLOAD ...]``; see benchmarks/README.md.
"""
