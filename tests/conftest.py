import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Live-search data of every process the tests start (servers, CLI) stays out of the user's home.
os.environ.setdefault("GROKSTACK_DATA_DIR", tempfile.mkdtemp(prefix="grokstack-test-data-"))
