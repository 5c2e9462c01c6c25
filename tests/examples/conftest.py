import pytest

from tests.helpers import load_script


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module (examples are scripts, not a package)."""
    return load_script(f"examples/{name}.py")


@pytest.fixture
def example():
    return load_example
