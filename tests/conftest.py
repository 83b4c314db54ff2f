import os

# Tests never reach a hub: everything they load is built in code or by the smoke world.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see lpo/cli.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above, which torch reads at import)

# `pytest -n N` runs N workers side by side: each takes its share of the cores, not all of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

if not torch.cuda.is_available():
    # The Triton reward head runs on the CPU interpreter in tests; triton reads this when first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
