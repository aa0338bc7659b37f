"""Data sets shipped with metacore. See omniglot.py for Omniglot (files, splits, sampler)."""
from metacore.data.omniglot import (Episode, EpisodeSampler, Omniglot, lake_episodes, lake_run,
                                    load_omniglot, split_characters)

__all__ = ["Episode", "EpisodeSampler", "Omniglot", "lake_episodes", "lake_run",
           "load_omniglot", "split_characters"]
