"""The router: runs the dense part of the model with continuous batching and dispatches experts."""
