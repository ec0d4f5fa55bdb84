"""lorakit's benchmarks, each a runner that rewrites its own section of results.md:

    python -m benchmarks              perf.py: speed and memory of lorakit and PEFT against the floor
    python -m benchmarks.sentiment    sentiment.py: the sentiment job, lorakit LoRA vs full vs PEFT + Trainer
    python -m benchmarks.qlora        qlora.py: LoRA over an NF4 base vs over the float base

perf.py's parts: cases.py (what is measured), models.py (models, batches, variants), timing.py (the timed
steps), memory.py (the memory probes), report.py (its section). common.py is what the runners share.

Every benchmark runs offline with single-threaded tokenizers: set here, before any of them imports transformers.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
