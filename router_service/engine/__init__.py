"""Continuous-batching engine: sequences, scheduler, paged KV cache, sampler, step loop."""
