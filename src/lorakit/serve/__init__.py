"""`lorakit serve`: an OpenAI-compatible server for one base model and many adapters.

`Engine` batches concurrent requests for different adapters into one forward per decoding
step (`lorakit.routing`); `app.create_app` puts the OpenAI HTTP API on it (needs
`pip install 'lorakit[serve]'`).
"""

from .engine import Engine
from .errors import BadRequest, EngineClosed, ModelNotFound, QueueFull, ServeError
from .sampling import Sampling
from .sequence import Failed, Finish, Job, Piece

__all__ = [
    "BadRequest",
    "Engine",
    "EngineClosed",
    "Failed",
    "Finish",
    "Job",
    "ModelNotFound",
    "Piece",
    "QueueFull",
    "Sampling",
    "ServeError",
]
