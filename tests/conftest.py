import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def shared():
    if not SHARED.is_dir():
        pytest.skip("../shared is not beside the checkout")
    return SHARED
