"""transformers stays optional: `import fused_lm` (and even `import fused_lm.transformers`) does
not import it, and using fused_lm.transformers without it raises an ImportError that says what
to install. Runs in a fresh interpreter (this one may have transformers imported already)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import fused_lm, fused_lm.nn, fused_lm.optim, fused_lm.transformers as flt
import fused_lm.nn.functional as F
F.cross_entropy
print("imported:", sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate')))
sys.modules['transformers'] = None          # `import transformers` now fails as if not installed
try:
    flt.apply_fused_lm(model_type='llama')
except ImportError as exc:
    print('ImportError:', exc)
"""


def test_transformers_is_optional():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "imported: []" in proc.stdout, proc.stdout
    assert "ImportError: fused_lm.transformers needs Hugging Face transformers" in proc.stdout
    assert "pip install 'transformers==" in proc.stdout
