import os

# Tests never reach a hub: everything they load is built in code or by the smoke world.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see lpo/cli.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
