"""tunelab: fine-tune a language model on your own domain data, and prove whether it helped."""

from tunelab.config import FineTuningConfig
from tunelab.errors import TunelabError
from tunelab.messages import install_console_handler

install_console_handler()  # notes on stdout, warnings on stderr, as logging records

__version__ = "0.1.0"

__all__ = ["FineTuner", "FineTuningConfig", "TunelabError", "__version__"]


def __getattr__(name: str):  # the heavy imports (torch, transformers) wait until needed
    if name == "FineTuner":
        from tunelab.api import FineTuner

        return FineTuner
    raise AttributeError(name)
