import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

# Tests run on CPU with gloo whatever the machine has.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed JIT-builds a small communication helper into the torch extensions cache; a cache shared by
# several virtual environments (one per checkout) is rebuilt on every launch. One cache per venv.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
