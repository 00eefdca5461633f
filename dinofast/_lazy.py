"""Module attributes imported on first access (PEP 562), so that `import dinofast` does not pull in
the model and data layers' dependencies (transformers, safetensors, Pillow)."""
import importlib
from typing import Callable, Dict, Tuple


def lazy_attributes(package: str, table: Dict[str, str], namespace: dict) -> Tuple[Callable, Callable]:
    """(__getattr__, __dir__) for `package`: table maps an attribute to the module that defines it
    (an attribute that names the module itself, e.g. "models" -> "dinofast.models", is the module)."""

    def __getattr__(name):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = importlib.import_module(module)
        if not module.endswith("." + name):
            value = getattr(value, name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__():
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
