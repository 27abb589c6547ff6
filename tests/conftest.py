import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Test processes share two cores: OpenMP threads that spin while waiting starve each other (the guard's encoder
# slowed 20-fold). Set before torch loads; every process the tests start inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Live-search data of every process the tests start (servers, CLI) stays out of the user's home.
os.environ.setdefault("GROKSTACK_DATA_DIR", tempfile.mkdtemp(prefix="grokstack-test-data-"))
# ...but the trained guard classifier (about a minute of training) is kept across sessions, keyed by its seed.
os.environ.setdefault("GROKSTACK_GUARD_CACHE", str(ROOT / ".cache" / "guard"))
