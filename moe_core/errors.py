"""Errors that name what was wrong and where, instead of a stack trace from deep inside torch."""


class MoeServeError(Exception):
    """Base class of every error moe-serve raises on purpose."""


class ConfigError(MoeServeError):
    """A model's config.json is missing a field, has a bad value, or describes an unsupported model."""


class CheckpointError(MoeServeError):
    """A safetensors file is missing, corrupt, or lacks a tensor the model needs."""


class TokenizerError(MoeServeError):
    """tokenizer.json or tokenizer_config.json is missing or unusable."""


class RequestError(MoeServeError):
    """A generation request is invalid (bad sampling values, prompt too long, unknown token ids)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnavailableError(MoeServeError):
    """A service the request needs (an expert shard, a router) has no live instance right now."""


class CapacityError(RequestError):
    """A request can never fit the engine's KV-cache or length limits."""
