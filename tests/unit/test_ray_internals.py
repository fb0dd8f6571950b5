"""Every private Ray name imgcls uses still exists in the installed Ray: a Ray upgrade
that removes one fails here, by its name, before any job does."""

import pytest

from imgcls.ray_internals import INTERNALS, resolve


@pytest.mark.parametrize("name", sorted(INTERNALS))
def test_ray_internal_exists(name):
    assert resolve(name) is not None


def test_no_other_module_imports_ray_internals():
    """imgcls reaches into Ray's private modules only through ``imgcls.ray_internals``."""
    import re
    from pathlib import Path

    import imgcls

    package = Path(imgcls.__file__).parent
    private = re.compile(r"\bray(\.\w+)*\._\w+|\bfrom ray(\.\w+)* import .*\b_[a-z]\w*")
    found = [f"{path.relative_to(package)}: {line.strip()}" for path in package.rglob("*.py")
             if path.name != "ray_internals.py"
             for line in path.read_text().splitlines() if private.search(line) and not line.lstrip().startswith("#")]
    assert not found, found
