"""transformers stays optional: `import fused_lm` (and even `import fused_lm.transformers`) does
not import it, and using fused_lm.transformers without it raises an ImportError that says what
to install. Runs in fresh interpreters (this one may have transformers imported already)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_import_fused_lm_does_not_import_transformers():
    proc = _python("import sys, fused_lm, fused_lm.nn, fused_lm.optim, fused_lm.transformers\n"
                   "import fused_lm.nn.functional as F; F.cross_entropy\n"
                   "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate')))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_clear_error_without_transformers():
    # sys.modules[name] = None makes `import name` raise ImportError, as if not installed.
    proc = _python("import sys\nsys.modules['transformers'] = None\n"
                   "import fused_lm.transformers as flt\n"
                   "try:\n    flt.apply_fused_lm(model_type='llama')\n"
                   "except ImportError as exc:\n    print('ImportError:', exc)\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ImportError: fused_lm.transformers needs Hugging Face transformers" in proc.stdout
    assert "pip install 'transformers==" in proc.stdout
