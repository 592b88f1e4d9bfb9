"""triton_lstm: a drop-in torch.nn.LSTM whose recurrence runs in persistent Triton kernels."""
from importlib.metadata import PackageNotFoundError, version

from .autograd import LSTMFunction, lstm_layer
from .functional import lstm
from .module import LSTM, LSTMInputError, enable_fullgraph
from .policy import explain

try:
    __version__ = version("triton_lstm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["LSTM", "LSTMFunction", "LSTMInputError", "enable_fullgraph", "explain", "lstm",
           "lstm_layer", "__version__"]
