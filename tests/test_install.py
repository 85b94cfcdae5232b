import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_non_editable_install_finds_its_properties(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), REPO],
        check=True, cwd=tmp_path,
    )
    code = (
        "import recbole_cdsr.utils as u; from recbole_cdsr.config import CDSRConfig;"
        "c = CDSRConfig('SASRecF', 'food-kitchen');"
        "print(u.properties_dir()); print(c['selected_features'], c['eval_neg_num'])"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env,
                         capture_output=True, text=True).stdout.splitlines()
    assert out[0] == str(target / "recbole_cdsr" / "properties")
    assert out[1] == "['domain'] 999"
