"""npr-async: distributed, asynchronous RL for native parallel reasoners."""
__version__ = "0.1.0"
