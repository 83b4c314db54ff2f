import os

# Tests never reach a hub: everything they load is built in code or by the smoke world.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see lpo/cli.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above, which torch reads at import)

if not torch.cuda.is_available():
    # The Triton reward head runs on the CPU interpreter in tests; triton reads this when first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
